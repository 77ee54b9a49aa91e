"""Checkpoints: safetensors + JSON, atomic writes, clear errors for damaged files, never pickle."""
import json
import os
import struct

import pytest
import torch

from torchdiffusion import checkpoint as ckpt
from torchdiffusion.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


def _groups():
    g = torch.Generator().manual_seed(0)
    return {"model": {"w": torch.randn(3, 4, generator=g), "b": torch.arange(5)},
            "rng": {"state": torch.randint(0, 255, (16,), dtype=torch.uint8, generator=g)}}


def test_roundtrip(tmp_path):
    p = save_checkpoint(tmp_path / "a.safetensors", meta={"step": 7, "config": {"x": [1, 2]}}, **_groups())
    meta, groups = load_checkpoint(p)
    assert meta["step"] == 7 and meta["config"] == {"x": [1, 2]}
    for name, group in _groups().items():
        for k, v in group.items():
            assert torch.equal(groups[name][k], v)


def test_file_is_safetensors_not_pickle(tmp_path):
    p = save_checkpoint(tmp_path / "a.safetensors", meta={"step": 1}, **_groups())
    raw = p.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])  # a JSON header, as the safetensors format defines
    assert "model.w" in header and json.loads(header["__metadata__"]["torchdiffusion"])["step"] == 1
    assert not raw.startswith(b"\x80")  # no pickle protocol marker


def test_truncated_and_garbage_files(tmp_path):
    p = save_checkpoint(tmp_path / "a.safetensors", meta={"step": 1}, **_groups())
    raw = p.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        load_checkpoint(tmp_path / "cut.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        load_checkpoint(tmp_path / "junk.safetensors")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.safetensors")


def test_foreign_safetensors_file(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "f.safetensors"))
    with pytest.raises(CheckpointError, match="not a torchdiffusion checkpoint"):
        load_checkpoint(tmp_path / "f.safetensors")


def test_failed_write_keeps_previous_file(tmp_path, monkeypatch):
    p = save_checkpoint(tmp_path / "a.safetensors", meta={"step": 1}, **_groups())
    before = p.read_bytes()

    def boom(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", boom)
    with pytest.raises(OSError):
        save_checkpoint(p, meta={"step": 2}, **_groups())
    assert p.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors"]  # no temporary file left behind


def test_optimizer_state_roundtrip(tmp_path):
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    tensors, meta = ckpt.optimizer_to_flat(opt)
    p = save_checkpoint(tmp_path / "o.safetensors", meta={"optimizer": meta}, optim=tensors)
    m, groups = load_checkpoint(p)
    opt2 = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=1.0)
    opt2.load_state_dict(ckpt.optimizer_from_flat(groups["optim"], m["optimizer"]))
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s2["param_groups"][0]["lr"] == 1e-2
    for k in s1["state"]:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(s1["state"][k][name], s2["state"][k][name])
