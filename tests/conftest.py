"""Shared fixtures."""
import os
import signal
from pathlib import Path

import pytest
import torch

from torchdiffusion.app import cli
from torchdiffusion.training import Hook


THREADS_ENV = "TORCHDIFFUSION_TEST_THREADS"  # torch intra-op threads of the test session (default 1)


@pytest.fixture(scope="session", autouse=True)
def torch_threads():
    """The tests run many small ops: one intra-op thread is as fast and does not stall when other jobs share
    the cores. TORCHDIFFUSION_TEST_THREADS=2 (or more) runs the suite with that many threads instead, to check
    that no result depends on the thread count (restored after the session)."""
    value = os.environ.get(THREADS_ENV, "1")
    if not value.isdigit() or int(value) < 1:
        raise pytest.UsageError(f"{THREADS_ENV} must be a positive integer, got {value!r}")
    n = torch.get_num_threads()
    torch.set_num_threads(int(value))
    yield int(value)
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


@pytest.fixture(scope="session")
def fashion_mnist_path():
    """Fashion-MNIST prepared once in the user cache (`torchdiffusion prepare-data --dataset fashion-mnist`: from
    the installed Debian package, the download mirrors, or `apt-get download dataset-fashion-mnist`, ~5 s)."""
    from torchdiffusion.data import prepare_fashion_mnist

    return prepare_fashion_mnist()


@pytest.fixture(scope="session")
def fashion_feature_net(fashion_mnist_path):
    """The Fashion-MNIST evaluation feature network in the user cache (`torchdiffusion train-feature-net --dataset
    fashion-mnist`), trained here once when missing (6 epochs, about three minutes on 2 cores)."""
    from torchdiffusion.evaluate.features import feature_net_path, train_feature_net

    path = feature_net_path("fashion-mnist")
    if not path.exists():
        n = torch.get_num_threads()
        torch.set_num_threads(os.cpu_count() or 1)
        try:
            train_feature_net("fashion-mnist", progress=False)
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
    """The benchmark script bench/<name>.py of this checkout as a module (benchmarks live outside the package)."""
    return cli.load_bench(name, BENCH_DIR)


@pytest.fixture(scope="session")
def bench():
    """``bench("samplers")`` -> the module of bench/samplers.py."""
    cache = {}
    return lambda name: cache.setdefault(name, load_bench(name))


class InterruptAt(Hook):
    """Ctrl-C after step `step`: this process gets SIGINT there, and the trainer saves that clean point and raises
    KeyboardInterrupt (a run stopped between checkpoints, to be continued)."""

    every = 1

    def __init__(self, step: int):
        self.step = step

    def __call__(self, trainer):
        if trainer.step == self.step:
            os.kill(os.getpid(), signal.SIGINT)


@pytest.fixture
def interrupt_at():
    """The hook class InterruptAt: `tr.hooks.append(interrupt_at(8))` stops a run by SIGINT after step 8."""
    return InterruptAt
