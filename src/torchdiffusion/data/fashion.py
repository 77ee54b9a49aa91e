"""Fashion-MNIST (Xiao et al. 2017), prepared once into the user cache as
``<cache>/fashion-mnist/fashion-mnist.npz`` (uint8 arrays, the layout of MNIST's cache file).

60,000 training and 10,000 test images of 28x28 grey clothing articles in 10 classes (:data:`FASHION_CLASSES`),
in the IDX format of MNIST (read with :func:`torchdiffusion.data.mnist.read_idx`). Sources, tried in order until
one works:

1. ``local``: the four IDX ``.gz`` files, or the Debian package file ``dataset-fashion-mnist_*.deb``, placed by
   hand in ``<cache>/fashion-mnist/`` (no network needed);
2. ``system``: the files that Debian's ``dataset-fashion-mnist`` package installs in
   ``/usr/share/datasets/fashion-mnist/`` (``apt install dataset-fashion-mnist``);
3. ``mirrors``: the download from Zalando Research's mirrors (short timeout);
4. ``apt``: ``apt-get download dataset-fashion-mnist`` (fetches the 31 MB package without installing it and
   without root), read straight out of the ``.deb``.

A ``.deb`` is read by the standard library (an ``ar`` archive holding ``data.tar.xz``); only the four IDX members
are taken out of it, and nothing is unpacked to disk. Every file is checked against the SHA-256 of its
decompressed IDX content, whatever its source (Debian's package recompresses the upstream ``.gz`` files, so their
own hashes differ from the upstream ones). Where apt is not available, download the four files from
:data:`FASHION_MIRRORS` (or the ``.deb`` from any Debian mirror) into ``<cache>/fashion-mnist/`` and run
``torchdiffusion prepare-data --dataset fashion-mnist`` again.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from pathlib import Path

from ..utils import check_choice
from .cache import cache_dir
from .mnist import read_idx, read_mnist_npz, split_tensors, write_first_valid

FASHION_DIR = "fashion-mnist"                   # folder in the cache
FASHION_MIRRORS = (
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
)
# key in the npz -> (IDX file name, SHA-256 of the decompressed IDX file)
FASHION_FILES = {
    "x_train": ("train-images-idx3-ubyte.gz", "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"),
    "y_train": ("train-labels-idx1-ubyte.gz", "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"),
    "x_test": ("t10k-images-idx3-ubyte.gz", "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"),
    "y_test": ("t10k-labels-idx1-ubyte.gz", "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
}
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")
DEBIAN_PACKAGE = "dataset-fashion-mnist"        # Debian's package of the data set (architecture all, 31 MB)
DEBIAN_DATA_DIR = "usr/share/datasets/fashion-mnist"  # where the package puts the IDX files
SYSTEM_DIR = Path("/") / DEBIAN_DATA_DIR        # ... once installed
FASHION_SOURCES = ("local", "system", "mirrors", "apt")
APT_TIMEOUT = 600.0                             # seconds for `apt-get download`


def _log(msg: str, verbose: bool) -> None:
    if verbose:
        print(f"[torchdiffusion.fashion-mnist] {msg}", file=sys.stderr, flush=True)


def fashion_path(root=None) -> Path:
    """Where the prepared file lives: ``<root or cache_dir()>/fashion-mnist/fashion-mnist.npz``."""
    return Path(root if root is not None else cache_dir()).expanduser() / FASHION_DIR / "fashion-mnist.npz"


def _arrays_from_idx(fetch) -> dict:
    """fetch(file name) -> bytes of the file (.gz or not); returns the four arrays, each checked by SHA-256."""
    out = {}
    for key, (name, sha) in FASHION_FILES.items():
        blob = fetch(name)
        raw = gzip.decompress(blob) if blob[:2] == b"\x1f\x8b" else blob
        digest = hashlib.sha256(raw).hexdigest()
        if digest != sha:
            raise ValueError(f"{name}: SHA-256 of the IDX content is {digest}, expected {sha}")
        out[key] = read_idx(raw)
    return out


def _from_folder(folder: Path) -> dict:
    missing = [name for name, _ in FASHION_FILES.values() if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"not in {folder}: {', '.join(missing)}")
    return _arrays_from_idx(lambda name: (folder / name).read_bytes())


def _ar_members(data: bytes) -> dict:
    """The members {name: bytes} of an ``ar`` archive (the container of a Debian package)."""
    if data[:8] != b"!<arch>\n":
        raise ValueError("not a Debian package (no ar archive header)")
    out, pos = {}, 8
    while pos + 60 <= len(data):
        header = data[pos:pos + 60]
        if header[58:60] != b"`\n":
            raise ValueError(f"malformed ar member header at byte {pos}")
        name = header[:16].decode("ascii", "replace").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip())
        out[name] = data[pos + 60:pos + 60 + size]
        pos += 60 + size + (size % 2)  # members are padded to an even length
    return out


def read_deb_files(deb, names) -> dict:
    """{name: bytes} of the files `names` under ``usr/share/datasets/fashion-mnist/`` in a ``.deb``, read from its
    ``data.tar.{xz,gz,bz2}`` with the standard library (no dpkg, nothing written to disk)."""
    members = _ar_members(Path(deb).read_bytes())
    data_tar = next((v for k, v in members.items() if k.startswith("data.tar")), None)
    if data_tar is None:
        raise ValueError(f"{deb} has no data.tar member (members: {', '.join(members)})")
    out = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data_tar), mode="r:*") as tar:
            for m in tar.getmembers():
                path = m.name.lstrip("./")
                base = path.rsplit("/", 1)[-1]
                if m.isfile() and path == f"{DEBIAN_DATA_DIR}/{base}" and base in names:
                    out[base] = tar.extractfile(m).read()
    except tarfile.ReadError as e:  # e.g. data.tar.zst, which the standard library cannot read
        raise ValueError(f"cannot read the data archive of {deb} ({e}); unpack it with `dpkg-deb -x {deb} DIR` and "
                         f"copy DIR/{DEBIAN_DATA_DIR}/*.gz into the cache folder") from e
    missing = [n for n in names if n not in out]
    if missing:
        raise FileNotFoundError(f"{deb} has no {', '.join(missing)} under {DEBIAN_DATA_DIR}/")
    return out


def _from_deb(deb: Path) -> dict:
    files = read_deb_files(deb, [name for name, _ in FASHION_FILES.values()])
    return _arrays_from_idx(files.__getitem__)


def _from_local(folder: Path, verbose: bool) -> dict:
    debs = sorted(folder.glob(f"{DEBIAN_PACKAGE}_*.deb"))
    if debs and not all((folder / name).is_file() for name, _ in FASHION_FILES.values()):
        _log(f"reading {debs[-1]}", verbose)
        return _from_deb(debs[-1])
    return _from_folder(folder)


def _from_mirror(base: str, timeout: float, verbose: bool) -> dict:
    def fetch(name):
        _log(f"downloading {base}{name}", verbose)
        with urllib.request.urlopen(base + name, timeout=timeout) as r:
            return r.read()

    return _arrays_from_idx(fetch)


def apt_download(dest: Path, timeout: float = APT_TIMEOUT) -> Path:
    """``apt-get download dataset-fashion-mnist`` into `dest` (no root, nothing installed); returns the .deb."""
    if shutil.which("apt-get") is None:
        raise FileNotFoundError("apt-get is not available on this system")
    res = subprocess.run(["apt-get", "download", DEBIAN_PACKAGE], cwd=dest, capture_output=True, text=True,
                         timeout=timeout)
    debs = sorted(Path(dest).glob(f"{DEBIAN_PACKAGE}_*.deb"))
    if res.returncode != 0 or not debs:
        tail = (res.stderr or res.stdout).strip().splitlines()[-2:]
        raise RuntimeError(f"apt-get download {DEBIAN_PACKAGE} failed (exit {res.returncode}): {' | '.join(tail)}")
    return debs[-1]


def _from_apt(verbose: bool) -> dict:
    with tempfile.TemporaryDirectory(prefix="torchdiffusion-fashion-") as tmp:
        _log(f"apt-get download {DEBIAN_PACKAGE}", verbose)
        return _from_deb(apt_download(Path(tmp)))


def _tries(source: str, folder: Path, timeout: float, verbose: bool) -> list:
    """[(label, function returning the arrays)] for one source."""
    if source == "local":
        return [(f"IDX files or {DEBIAN_PACKAGE}_*.deb in {folder}", lambda: _from_local(folder, verbose))]
    if source == "system":
        return [(f"the installed {DEBIAN_PACKAGE} package ({SYSTEM_DIR})", lambda: _from_folder(SYSTEM_DIR))]
    if source == "mirrors":
        return [(m, lambda m=m: _from_mirror(m, timeout, verbose)) for m in FASHION_MIRRORS]
    check_choice("Fashion-MNIST source", source, FASHION_SOURCES)
    return [(f"apt-get download {DEBIAN_PACKAGE}", lambda: _from_apt(verbose))]


def _not_found(folder: Path, attempts: list) -> RuntimeError:
    names = ", ".join(name for name, _ in FASHION_FILES.values())
    return RuntimeError(
        "could not prepare Fashion-MNIST; tried:\n" + "\n".join(attempts) +
        f"\nTo install it by hand: download {names} from {FASHION_MIRRORS[0]} into {folder}/, or on a Debian or "
        f"Ubuntu machine run `apt-get download {DEBIAN_PACKAGE}` and put the .deb into {folder}/ (where apt is not "
        f"available, the .deb can be fetched from any Debian mirror, pool/main/d/{DEBIAN_PACKAGE}/); then run "
        f"`torchdiffusion prepare-data --dataset fashion-mnist` again.")


def read_fashion_npz(path) -> dict:
    """Load and validate a prepared fashion-mnist.npz; a bad file raises RuntimeError telling how to rebuild it."""
    try:
        return read_mnist_npz(path)
    except RuntimeError as e:
        raise RuntimeError(f"Fashion-MNIST cache file {path} is malformed or corrupt ({e.__cause__ or e}). Delete "
                           f"it, or run `torchdiffusion prepare-data --dataset fashion-mnist --force`.") from e


def prepare_fashion_mnist(root=None, *, verbose: bool = True, force: bool = False, timeout: float = 10.0,
                          sources=FASHION_SOURCES) -> Path:
    """Make sure ``<root or cache_dir()>/fashion-mnist/fashion-mnist.npz`` exists and is valid; returns its path.

    An existing valid file is kept (``force=True`` rebuilds it). ``sources`` picks among
    :data:`FASHION_SOURCES` (see the module docstring), tried in the order given.
    """
    path = fashion_path(root)
    if path.exists() and not force:
        read_fashion_npz(path)
        return path
    attempts, start = [], time.perf_counter()
    for source in sources:
        if write_first_valid(_tries(source, path.parent, timeout, verbose), path, attempts, start=start,
                             verbose=verbose, quiet=source == "local"):
            return path
    raise _not_found(path.parent, attempts)


def load_fashion_mnist(split: str = "train", root=None, *, verbose: bool = True):
    """Fashion-MNIST ``split`` ('train': 60000, 'test': 10000) as (uint8 images (N, 1, 28, 28), int64 labels (N,));
    prepares the cache file on first use."""
    check_choice("Fashion-MNIST split", split, ("train", "test"))
    path = fashion_path(root)
    if not path.exists():
        prepare_fashion_mnist(root, verbose=verbose)
    return split_tensors(read_fashion_npz(path), split)
