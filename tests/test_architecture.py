"""The layer rules of docs/architecture.md, checked on the source: which part of the package may import which."""
import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "torchdiffusion"

# part -> parts it must never import (docs/architecture.md, "What may import what")
NEVER = {
    "core": {"edit", "sampling", "nets", "data", "training", "evaluate", "app", "build", "config", "checkpoint",
             "viz"},
    "edit": {"nets", "data", "training", "evaluate", "app", "build", "config", "checkpoint", "viz"},
    "sampling": {"nets", "data", "training", "evaluate", "app", "build", "config", "checkpoint", "viz"},
    "nets": {"sampling", "data", "training", "evaluate", "app", "build", "config", "checkpoint", "viz", "core"},
    "data": {"sampling", "nets", "training", "evaluate", "app", "build", "config", "checkpoint", "viz", "core"},
    "build": {"training", "evaluate", "app", "viz"},
    "interop": {"edit", "sampling", "data", "training", "evaluate", "app", "build", "config", "viz"},
    "latent": {"training", "evaluate", "app", "build", "config", "viz", "interop", "fewstep"},
    "fewstep": {"nets", "data", "training", "evaluate", "app", "build", "config", "viz", "interop", "latent",
                "checkpoint"},
    "discrete": {"core", "edit", "sampling", "nets", "data", "training", "evaluate", "app", "build", "config",
                 "checkpoint", "viz", "interop", "latent", "fewstep"},
    "config": {"training", "evaluate", "app", "viz", "build"},
    "checkpoint": {"core", "edit", "sampling", "nets", "data", "training", "evaluate", "app", "build", "config", "viz"},
    "viz": {"core", "edit", "sampling", "nets", "data", "training", "evaluate", "app", "build", "config",
            "checkpoint"},
    "text_encoder": {"core", "edit", "sampling", "nets", "training", "evaluate", "app", "build", "config",
                     "checkpoint", "viz", "interop", "latent", "fewstep", "discrete"},
    "training": {"evaluate", "app", "viz", "sampling"},
    "evaluate": {"training", "app", "viz"},
}
CORE = {"schedules", "precond", "objectives", "guidance", "variance", "vdm"}  # utils is shared by every part


def part_of(module: str) -> str | None:
    """'torchdiffusion.sampling.core' -> 'sampling'; the flat core modules -> 'core'; utils -> None (shared)."""
    head = module.split(".")[1] if module.count(".") else ""
    if head in CORE:
        return "core"
    if head == "edit":
        return "edit"
    return None if head in ("", "utils") else head


def imports(path: Path) -> set[str]:
    """The package modules a source file imports (relative imports resolved)."""
    rel = path.relative_to(SRC.parent).with_suffix("")
    pkg = list(rel.parts[:-1]) if rel.name != "__init__" else list(rel.parts[:-1])
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = pkg[: len(pkg) - node.level + 1] if node.level else []
            name = ".".join(base + ([node.module] if node.module else []))
            if name.startswith("torchdiffusion"):
                out.add(name)
                out.update(f"{name}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("torchdiffusion"))
    return out


FILES = sorted(SRC.rglob("*.py"))


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(SRC)))
def test_layer_rules(path):
    module = ".".join(path.relative_to(SRC.parent).with_suffix("").parts)
    mine = part_of(module)
    if mine not in NEVER:
        return
    bad = sorted({m for m in imports(path) if part_of(m) in NEVER[mine] and part_of(m) != mine})
    assert not bad, f"{module} ({mine}) imports {bad}, which docs/architecture.md forbids"


def test_the_rules_see_imports():
    """The checker finds a forbidden import where one is (the trainer must not import viz, and does not)."""
    trainer = SRC / "training" / "trainer.py"
    assert "torchdiffusion.build" in imports(trainer) and "torchdiffusion.viz" not in imports(trainer)
    assert part_of("torchdiffusion.precond") == "core" and part_of("torchdiffusion.utils") is None
    assert "torchdiffusion.sampling.generate" in imports(SRC / "edit.py")
