"""The sentence encoder, loaded once for the tests that need it (skipped, saying how to install it, without it)."""
import pytest

from torchdiffusion.text_encoder import SentenceEncoder, install_command, missing_parts


def skip_without_encoder():
    """Skip the calling test when the optional encoder is not installed."""
    if missing_parts():
        pytest.skip(f"the optional sentence encoder is not installed ({', '.join(missing_parts())}): "
                    f"{install_command()}")


@pytest.fixture(scope="session")
def sentence_encoder():
    skip_without_encoder()
    return SentenceEncoder()
