"""Shared fixtures."""
import importlib.util
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """The tests run many small ops: one intra-op thread is as fast and does not stall when other jobs share
    the cores (restored after the session)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def mnist_path():
    """MNIST prepared once per session in the user cache (downloads on the very first run, ~10-30 s)."""
    from torchdiffusion.data import prepare_mnist

    return prepare_mnist()


@pytest.fixture(scope="session")
def feature_net(mnist_path):
    """The MNIST evaluation feature network in the user cache: the file `torchdiffusion train-feature-net` writes,
    trained here once when missing (3 epochs, about a minute and a half on 2 cores)."""
    import os

    from torchdiffusion.evaluate.features import feature_net_path, train_feature_net

    path = feature_net_path("mnist")
    if not path.exists():
        n = torch.get_num_threads()
        torch.set_num_threads(os.cpu_count() or 1)
        try:
            train_feature_net("mnist", progress=False)
        finally:
            torch.set_num_threads(n)
    return path


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    """An empty cache directory used by cache_dir() for the duration of one test."""
    root = tmp_path / "cache"
    monkeypatch.setenv("TORCHDIFFUSION_CACHE", str(root))
    return root


BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"


def load_bench(name: str):
    """The benchmark script bench/<name>.py as a module (benchmarks live outside the package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def bench():
    """``bench("samplers")`` -> the module of bench/samplers.py."""
    cache = {}
    return lambda name: cache.setdefault(name, load_bench(name))
