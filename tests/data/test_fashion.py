"""Fashion-MNIST: preparation from a Debian package, the installed package, apt-get download and the mirrors (on a
tiny fake IDX set in a temporary cache), and the real data set."""
import gzip
import hashlib
import io
import shutil
import tarfile

import numpy as np
import pytest
import torch

from torchdiffusion.app.cli import main
from torchdiffusion.data import fashion, make_dataset, mnist
from torchdiffusion.data.fashion import (DEBIAN_DATA_DIR, DEBIAN_PACKAGE, FASHION_CLASSES, FASHION_FILES,
                                         load_fashion_mnist, prepare_fashion_mnist, read_deb_files)

TINY = {"x_train": (6, 28, 28), "y_train": (6,), "x_test": (4, 28, 28), "y_test": (4,)}


def _idx(a: np.ndarray) -> bytes:
    """An IDX file (uint8 payload): magic 0 0 0x08 ndim, big-endian dimensions, data."""
    return bytes([0, 0, 0x08, a.ndim]) + np.asarray(a.shape, dtype=">u4").tobytes() + a.astype(np.uint8).tobytes()


@pytest.fixture
def tiny(monkeypatch):
    """A tiny fake Fashion-MNIST: the arrays, their .gz files, and the module's hashes and shapes set to them."""
    rng = np.random.default_rng(0)
    arrays = {k: rng.integers(0, 256 if k.startswith("x") else 10, size=s).astype(np.uint8) for k, s in TINY.items()}
    files, table = {}, {}
    for key, (name, _) in FASHION_FILES.items():
        raw = _idx(arrays[key])
        files[name] = gzip.compress(raw)
        table[key] = (name, hashlib.sha256(raw).hexdigest())
    monkeypatch.setattr(fashion, "FASHION_FILES", table)
    monkeypatch.setattr(mnist, "MNIST_SHAPES", TINY)       # the shared shape check of the cache file
    return arrays, files


def _ar(members: dict) -> bytes:
    out = b"!<arch>\n"
    for name, data in members.items():
        header = f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}".encode() + b"`\n"
        out += header + data + (b"\n" if len(data) % 2 else b"")
    return out


def _deb(files: dict) -> bytes:
    """A Debian package as dpkg-deb builds it: ar(debian-binary, control.tar.xz, data.tar.xz)."""
    def tar_xz(entries: dict) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:xz") as tar:
            for path, data in entries.items():
                info = tarfile.TarInfo(path)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return buf.getvalue()

    data = {f"./{DEBIAN_DATA_DIR}/{name}": blob for name, blob in files.items()}
    data["./usr/share/doc/dataset-fashion-mnist/copyright"] = b"MIT"
    return _ar({"debian-binary": b"2.0\n", "control.tar.xz": tar_xz({"./control": b"Package: x\n"}),
                "data.tar.xz": tar_xz(data)})


def _offline(url, timeout):
    raise OSError("offline")


def _check_prepared(arrays):
    for split in ("train", "test"):
        x, y = load_fashion_mnist(split, verbose=False)
        assert torch.equal(x[:, 0], torch.from_numpy(arrays[f"x_{split}"])) and x.shape[1] == 1
        assert torch.equal(y, torch.from_numpy(arrays[f"y_{split}"].astype(np.int64)))


def test_prepare_from_a_deb_in_the_cache_folder(tmp_cache, tiny):
    arrays, files = tiny
    folder = tmp_cache / "fashion-mnist"
    folder.mkdir(parents=True)
    (folder / f"{DEBIAN_PACKAGE}_0.0~git20200523.55506a9-1_all.deb").write_bytes(_deb(files))
    path = prepare_fashion_mnist(sources=("local",), verbose=False)
    assert path == folder / "fashion-mnist.npz"
    _check_prepared(arrays)
    ds = make_dataset("fashion-mnist-test")
    assert len(ds) == 4 and ds.num_classes == 10 and ds.classes == FASHION_CLASSES and ds.name == "fashion-mnist-test"
    assert make_dataset("fashion-mnist", split="test").name == "fashion-mnist-test"
    x, y = make_dataset("fashion-mnist").batch([0, 5])
    assert x.shape == (2, 1, 28, 28) and -1 <= x.min() and x.max() <= 1
    assert y.tolist() == arrays["y_train"][[0, 5]].tolist()


def test_prepare_with_apt_get_download(tmp_cache, tiny, tmp_path, monkeypatch, capsys):
    """The `apt` source reads the package that `apt-get download` fetched (here: the fake one), and the command
    line prepares it with `prepare-data --dataset fashion-mnist`."""
    arrays, files = tiny
    deb = tmp_path / f"{DEBIAN_PACKAGE}_1_all.deb"
    deb.write_bytes(_deb(files))
    calls = []

    def fake_download(dest, timeout=fashion.APT_TIMEOUT):
        calls.append(dest)
        return shutil.copy(deb, dest)

    monkeypatch.setattr(fashion, "apt_download", fake_download)
    monkeypatch.setattr(fashion, "SYSTEM_DIR", tmp_path / "not-installed")
    monkeypatch.setattr(fashion.urllib.request, "urlopen", _offline)
    assert main(["prepare-data", "--dataset", "fashion-mnist"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_cache / "fashion-mnist" / "fashion-mnist.npz")
    assert len(calls) == 1
    _check_prepared(arrays)


def test_prepare_from_the_installed_package_and_the_mirrors(tmp_cache, tiny, tmp_path, monkeypatch):
    arrays, files = tiny
    system = tmp_path / "system"
    system.mkdir()
    for name, blob in files.items():
        (system / name).write_bytes(blob)
    monkeypatch.setattr(fashion, "SYSTEM_DIR", system)
    prepare_fashion_mnist(sources=("system",), verbose=False)
    _check_prepared(arrays)
    served = []

    class Response(io.BytesIO):
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    def fake_urlopen(url, timeout):
        served.append(url)
        return Response(files[url.rsplit("/", 1)[-1]])

    monkeypatch.setattr(fashion.urllib.request, "urlopen", fake_urlopen)
    prepare_fashion_mnist(sources=("mirrors",), verbose=False, force=True)
    assert len(served) == 4 and all(u.startswith(fashion.FASHION_MIRRORS[0]) for u in served)
    _check_prepared(arrays)


def test_a_wrong_file_is_refused_and_the_error_says_what_to_do(tmp_cache, tiny, monkeypatch):
    _, files = tiny
    folder = tmp_cache / "fashion-mnist"
    folder.mkdir(parents=True)
    for name, blob in files.items():
        (folder / name).write_bytes(blob)
    name = FASHION_FILES["y_test"][0]
    (folder / name).write_bytes(gzip.compress(_idx(np.zeros(4, dtype=np.uint8))))   # not the expected content
    monkeypatch.setattr(fashion, "SYSTEM_DIR", tmp_cache / "nowhere")
    monkeypatch.setattr(fashion.shutil, "which", lambda _: None)                    # no apt on this machine
    monkeypatch.setattr(fashion.urllib.request, "urlopen", _offline)
    with pytest.raises(RuntimeError) as e:
        prepare_fashion_mnist(verbose=False)
    msg = str(e.value)
    assert f"{name}: SHA-256" in msg and "offline" in msg and "apt-get is not available" in msg
    assert f"apt-get download {DEBIAN_PACKAGE}" in msg and "prepare-data --dataset fashion-mnist" in msg
    assert not (folder / "fashion-mnist.npz").exists()


def test_read_deb_files_refuses_other_files_and_missing_members(tmp_path, tiny):
    _, files = tiny
    bad = tmp_path / "x.deb"
    bad.write_bytes(b"PK\x03\x04 not an ar archive")
    with pytest.raises(ValueError, match="not a Debian package"):
        read_deb_files(bad, ["train-images-idx3-ubyte.gz"])
    partial = tmp_path / "partial.deb"
    partial.write_bytes(_deb({k: v for k, v in files.items() if not k.startswith("t10k")}))
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte.gz"):
        read_deb_files(partial, list(files))


def test_real_fashion_mnist(fashion_mnist_path):
    """The prepared file holds the published splits: 60,000 / 10,000 images, 6,000 / 1,000 per class."""
    train, test = make_dataset("fashion-mnist"), make_dataset("fashion-mnist-test")
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert train.labels.bincount().tolist() == [6000] * 10 and test.labels.bincount().tolist() == [1000] * 10
    assert not torch.equal(train.images[:100], make_dataset("mnist").images[:100])
    assert test.classes[9] == "Ankle boot"
