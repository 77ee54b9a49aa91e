"""The package builds as a wheel and an sdist, and the wheel alone (no source tree) imports, holds its presets and
answers --version."""
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    pytest.importorskip("build", reason="the build package is not installed (pip install 'torchdiffusion[dev]')")
    out = tmp_path_factory.mktemp("dist")
    r = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def test_wheel_and_sdist_are_built_with_their_contents(dist):
    wheel, = dist.glob("torchdiffusion-*.whl")
    sdist, = dist.glob("torchdiffusion-*.tar.gz")
    names = zipfile.ZipFile(wheel).namelist()
    assert "torchdiffusion/configs/demo.yaml" in names and "torchdiffusion/app/cli.py" in names
    assert not any(n.startswith(("tests/", "bench/")) for n in names)  # benchmarks stay outside the package
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert "Provides-Extra: onnx" in meta and "Provides-Extra: diffusers" in meta
    assert sdist.stat().st_size > 10_000


def test_installed_wheel_runs_without_the_source_tree(dist, tmp_path):
    wheel, = dist.glob("torchdiffusion-*.whl")
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": str(target)}
    code = ("import torchdiffusion, sys; from torchdiffusion.config import load_config; load_config('demo'); "
            "print(torchdiffusion.__file__)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert r.returncode == 0 and r.stdout.strip().startswith(str(target)), r.stderr
    r = subprocess.run([sys.executable, "-m", "torchdiffusion", "--version"], capture_output=True, text=True,
                       env=env, cwd=tmp_path, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "torchdiffusion 0.1.0"
