"""Checkpoints: safetensors + JSON, atomic writes, clear errors for damaged files, never pickle."""
import errno
import json
import os
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

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
    save_file({"w": torch.zeros(2)}, str(tmp_path / "f.safetensors"))
    with pytest.raises(CheckpointError, match="not a torchdiffusion checkpoint"):
        load_checkpoint(tmp_path / "f.safetensors")


def test_failed_write_keeps_previous_file(tmp_path, monkeypatch):
    p = save_checkpoint(tmp_path / "a.safetensors", meta={"step": 1}, **_groups())
    before = p.read_bytes()

    def boom(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckpt, "save_file", boom)
    with pytest.raises(CheckpointError) as info:
        save_checkpoint(p, meta={"step": 2}, **_groups())
    message = str(info.value)
    assert "\n" not in message and "No space left on device (ENOSPC)" in message and "previous file is kept" in message
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


def _flip_byte(path, offset_from_end=3):
    raw = bytearray(path.read_bytes())
    raw[-offset_from_end] ^= 0x01
    path.write_bytes(bytes(raw))


def test_checksum_detects_bit_rot_in_tensors_and_metadata(tmp_path):
    """One flipped bit in a tensor, or an edited metadata value that still parses, is refused; the stored
    checksum is the SHA-256 of the document and the tensors."""
    p = save_checkpoint(tmp_path / "a.safetensors", meta={"step": 7}, **_groups())
    from safetensors import safe_open

    with safe_open(str(p), framework="pt") as f:
        stored = f.metadata()
    assert stored[ckpt.CHECKSUM_KEY] == ckpt.checksum(stored[ckpt.META_KEY], load_file(str(p)))
    good = p.read_bytes()
    _flip_byte(p)
    with pytest.raises(CheckpointError, match="checksum does not match"):
        load_checkpoint(p)
    p.write_bytes(good.replace(b'\\"step\\": 7', b'\\"step\\": 8'))
    assert p.read_bytes() != good
    with pytest.raises(CheckpointError, match="checksum does not match"):
        load_checkpoint(p)


def test_checkpoints_without_a_checksum_still_load(tmp_path):
    """Files written before the checksum existed (metadata document only) load as before."""
    doc = json.dumps({"format_version": 1, "groups": ["model"], "step": 3})
    save_file({"model.w": torch.ones(2)}, str(tmp_path / "old.safetensors"), metadata={ckpt.META_KEY: doc})
    meta, groups = load_checkpoint(tmp_path / "old.safetensors")
    assert meta["step"] == 3 and torch.equal(groups["model"]["w"], torch.ones(2))


def test_non_finite_tensors_are_refused_when_written_and_when_read(tmp_path):
    groups = _groups()
    groups["model"]["w"][1, 2] = float("nan")
    with pytest.raises(CheckpointError, match="'model.w' holds NaN"):
        save_checkpoint(tmp_path / "a.safetensors", meta={"step": 1}, **groups)
    assert os.listdir(tmp_path) == []  # nothing written, no temporary file
    tensors = {"model.w": torch.tensor([1.0, float("inf")]), "model.b": torch.zeros(2)}
    doc = json.dumps({"format_version": 1, "groups": ["model"], "step": 1})
    save_file(tensors, str(tmp_path / "inf.safetensors"),
              metadata={ckpt.META_KEY: doc, ckpt.CHECKSUM_KEY: ckpt.checksum(doc, tensors)})
    with pytest.raises(CheckpointError, match="NaN or infinite values in tensor 'model.w'"):
        load_checkpoint(tmp_path / "inf.safetensors")


def _stepped_adamw():
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    return opt, *ckpt.optimizer_to_flat(opt)


@pytest.mark.parametrize("tamper, message", [
    (lambda t, m: t.update({"0.exp_avg": torch.zeros(5)}), r"'optim.0.exp_avg' is torch.float32 of shape \(5,\)"),
    (lambda t, m: t.update({"1.exp_avg_sq": torch.zeros(2, dtype=torch.float64)}),
     "'optim.1.exp_avg_sq' is torch.float64"),
    (lambda t, m: t.update({"0.step": torch.zeros(3)}), "'optim.0.step' must be a floating-point scalar"),
    (lambda t, m: t.update({"7.exp_avg": torch.zeros(2)}), "'7.exp_avg' names no parameter"),
    (lambda t, m: m["param_groups"].append(dict(m["param_groups"][0])), "must be a list of 1 parameter groups"),
    (lambda t, m: m["param_groups"][0]["params"].append(2), "group 0 holds 3 parameters, the model's has 2"),
    (lambda t, m: m.pop("param_groups"), "field 'param_groups' is missing"),
])
def test_optimizer_state_is_checked_against_the_optimizer(tamper, message):
    """A state tensor of another shape or dtype than its parameter would be read out of bounds by the fused AdamW
    kernel: it is refused, naming the tensor, before the optimizer sees it."""
    opt, tensors, meta = _stepped_adamw()
    fresh = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=1e-2)
    fresh.load_state_dict(ckpt.optimizer_from_flat(dict(tensors), json.loads(json.dumps(meta)), fresh, "f"))
    meta = json.loads(json.dumps(meta))
    tamper(tensors, meta)
    with pytest.raises(CheckpointError, match=message):
        ckpt.optimizer_from_flat(tensors, meta, fresh, "f")


def test_model_tensors_are_checked_by_name_shape_and_dtype():
    want = {"w": torch.zeros(3, 4), "b": torch.zeros(4)}
    ckpt.check_tensors("model", {"w": torch.ones(3, 4), "b": torch.ones(4)}, want, "f")
    with pytest.raises(CheckpointError, match=r"'model.w' is torch.float32 of shape \(4, 3\)"):
        ckpt.check_tensors("model", {"w": torch.ones(4, 3), "b": torch.ones(4)}, want, "f")
    with pytest.raises(CheckpointError, match="'model.b' is torch.float16"):
        ckpt.check_tensors("model", {"w": torch.ones(3, 4), "b": torch.ones(4, dtype=torch.float16)}, want, "f")
    with pytest.raises(CheckpointError, match=r"missing \['b'\], unexpected \['c'\]"):
        ckpt.check_tensors("model", {"w": torch.ones(3, 4), "c": torch.ones(4)}, want, "f")


def test_metadata_fields_missing_or_ill_typed_are_named():
    meta = {"step": 3, "best_val": 2, "flag": True, "sampler": {"epoch": "x"}}
    assert ckpt.meta_field(meta, "step", int, "f") == 3
    assert ckpt.meta_field(meta, "best_val", (float, type(None)), "f") == 2  # an integer is a number
    assert ckpt.meta_field(meta, "world_size", int, "f", default=1) == 1
    for name, kind, message in (("ema_updates", int, "'ema_updates' is missing"),
                                ("flag", int, "'flag' must be an integer, got True"),
                                ("sampler.epoch", int, "'sampler.epoch' must be an integer, got 'x'"),
                                ("step", dict, "'step' must be a mapping")):
        with pytest.raises(CheckpointError, match=message) as info:
            ckpt.meta_field(meta, name, kind, "f")
        assert "\\n" not in str(info.value)


def test_stale_temporary_files_are_removed(tmp_path):
    save_checkpoint(tmp_path / "last.safetensors", meta={"step": 1}, **_groups())
    (tmp_path / "last.safetensors.k2j3.tmp").write_bytes(b"x" * 1000)
    (tmp_path / "notes.tmp").write_text("not ours")
    assert ckpt.remove_stale_temp_files(tmp_path) == (1, 1000)
    assert sorted(os.listdir(tmp_path)) == ["last.safetensors", "notes.tmp"]


def test_damaged_file_advice_names_only_checkpoints_that_exist(tmp_path):
    p = save_checkpoint(tmp_path / "last.safetensors", meta={"step": 1}, **_groups())
    _flip_byte(p)
    with pytest.raises(CheckpointError, match="no other checkpoint is in that folder") as info:
        load_checkpoint(p)
    assert "older step" not in str(info.value)
    save_checkpoint(tmp_path / "best.safetensors", meta={"step": 1}, **_groups())
    with pytest.raises(CheckpointError, match=r"use another checkpoint of that folder \(best.safetensors\)"):
        load_checkpoint(p)
