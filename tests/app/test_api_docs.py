"""Every example of docs/api.md runs, in order, in one namespace (they share the tiny model the first one trains)."""
import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "api.md"


def blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_api_doc_examples_run(feature_net, capsys):
    code = blocks()
    assert len(code) >= 4
    namespace: dict = {}
    for i, block in enumerate(code):
        exec(compile(block, f"{DOC.name} block {i + 1}", "exec"), namespace)
    model = namespace["model"]
    assert model.shape == (1, 28, 28) and model.num_classes == 10
    assert "Model(" in capsys.readouterr().out
