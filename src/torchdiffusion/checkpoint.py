"""Checkpoints as safetensors + JSON, written atomically, checked when read, never loaded with pickle.

A checkpoint is one ``.safetensors`` file: tensors under prefixes (``model.``, ``ema.``, ``optim.``, ``rng.``)
and a JSON document in its metadata (key ``torchdiffusion``) holding the run configuration, the step, the
optimizer's hyperparameters, the data-order state and anything else that is not a tensor. A SHA-256 of that
document and of every tensor (name, dtype, shape, bytes) is stored beside it (key ``torchdiffusion.sha256``), so
a flipped bit anywhere is detected when the file is read (files written before the checksum existed still load).
Writing goes to a temporary file in the same folder, flushed and fsync'ed, then renamed over the target, so a
crash leaves either the old file or the new one, never half of one; a process killed while writing leaves its
temporary file behind, which :func:`remove_stale_temp_files` deletes. Non-finite floating-point tensors are
refused both when writing and when reading, naming the tensor.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

META_KEY = "torchdiffusion"
CHECKSUM_KEY = "torchdiffusion.sha256"
FORMAT_VERSION = 1
TMP_SUFFIX = ".tmp"  # temporary files are named <target name>.<random>.tmp beside the target
STEP_KEY = "step"    # the optimizer state entry that is a scalar counter, not a tensor shaped like its parameter


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, corrupted, inconsistent or not a torchdiffusion checkpoint."""


def _flatten(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v.detach().contiguous().cpu() for k, v in state.items()}


def _unflatten(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    p = prefix + "."
    return {k[len(p):]: v for k, v in tensors.items() if k.startswith(p)}


def _kind_name(kind) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {int: "an integer", float: "a number", str: "a string", dict: "a mapping", list: "a list",
             type(None): "null"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def meta_field(meta: dict, name: str, kind, where, *, default=...):
    """meta[name], checked to be of `kind` (a type or a tuple of types; a float field accepts integers, an int
    field refuses booleans); a dotted name ('sampler.epoch') looks inside mappings. A missing field raises
    CheckpointError naming it unless a `default` is given."""
    *parents, leaf = name.split(".")
    node = meta
    for part in parents:
        node = meta_field(node, part, dict, where)
    if leaf not in node:
        if default is not ...:
            return default
        raise CheckpointError(f"{where}: the metadata field {name!r} is missing")
    value = node[leaf]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if not ok and float in kinds and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        raise CheckpointError(f"{where}: the metadata field {name!r} must be {_kind_name(kind)}, got {value!r:.80}")
    return value


def optimizer_to_flat(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into tensors and a JSON-able remainder."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _param_id(key: str, n_params: int | None, where) -> tuple[int, str]:
    pid, _, k = key.partition(".")
    if not pid.isdigit() or not k or (n_params is not None and int(pid) >= n_params):
        raise CheckpointError(f"{where}: optimizer state entry {key!r} names no parameter of the optimizer "
                              f"({n_params} parameters)")
    return int(pid), k


def optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict, optimizer: torch.optim.Optimizer | None = None,
                        where="checkpoint") -> dict:
    """The optimizer state dict from its tensors and JSON remainder. With `optimizer`, everything is checked
    against it first: the parameter groups and their sizes, and each state tensor against its parameter (the
    moments of the same shape and dtype, the step counter a scalar), so a mismatched file is refused with a
    CheckpointError instead of being read out of bounds by a fused kernel."""
    groups = meta_field(meta, "param_groups", list, where)
    scalars = meta_field(meta, "scalars", dict, where, default={})
    params = None
    if optimizer is not None:
        params = [p for g in optimizer.param_groups for p in g["params"]]
        _check_param_groups(groups, optimizer, where)
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        pid, k = _param_id(key, None if params is None else len(params), where)
        if params is not None:
            _check_state_tensor(f"optim.{key}", v, params[pid], k, where)
        state.setdefault(pid, {})[k] = v
    for key, v in scalars.items():
        pid, k = _param_id(key, None if params is None else len(params), where)
        state.setdefault(pid, {})[k] = v
    return {"state": state, "param_groups": groups}


def _check_param_groups(groups: list, optimizer: torch.optim.Optimizer, where) -> None:
    mine = optimizer.param_groups
    if len(groups) != len(mine) or not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups):
        raise CheckpointError(f"{where}: the metadata field 'optimizer.param_groups' must be a list of "
                              f"{len(mine)} parameter groups, each with a 'params' list")
    for i, (g, m) in enumerate(zip(groups, mine)):
        if len(g["params"]) != len(m["params"]):
            raise CheckpointError(f"{where}: optimizer parameter group {i} holds {len(g['params'])} parameters, "
                                  f"the model's has {len(m['params'])}")


def _check_state_tensor(name: str, v: torch.Tensor, param: torch.Tensor, key: str, where) -> None:
    if key == STEP_KEY:
        if v.numel() != 1 or not v.is_floating_point():
            raise CheckpointError(f"{where}: tensor {name!r} must be a floating-point scalar, got {v.dtype} of "
                                  f"shape {tuple(v.shape)}")
    elif v.shape != param.shape or v.dtype != param.dtype:
        raise CheckpointError(f"{where}: tensor {name!r} is {v.dtype} of shape {tuple(v.shape)}, but its "
                              f"parameter is {param.dtype} of shape {tuple(param.shape)}")


def check_tensors(group: str, tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], where) -> None:
    """The tensors of a checkpoint group against what will receive them (e.g. ``net.state_dict()``): the same
    names, and each of the same shape and dtype. Raises CheckpointError naming the first mismatch."""
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise CheckpointError(f"{where}: the {group!r} tensors do not match the configured network (missing "
                              f"{missing[:3]}, unexpected {extra[:3]})")
    for name, want in expected.items():
        got = tensors[name]
        if got.shape != want.shape or got.dtype != want.dtype:
            raise CheckpointError(f"{where}: tensor '{group}.{name}' is {got.dtype} of shape {tuple(got.shape)}, "
                                  f"the network expects {want.dtype} of shape {tuple(want.shape)}")


def first_non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor holding a NaN or an infinity (None if all are finite)."""
    for name, t in tensors.items():
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            return name
    return None


def _raw_bytes(t: torch.Tensor):
    """The bytes of a tensor as a buffer (any dtype, bfloat16 included), without a copy for contiguous CPU data."""
    return t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()


def checksum(doc: str, tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the metadata document and of every tensor's name, dtype, shape and bytes (sorted by name)."""
    h = hashlib.sha256(doc.encode())
    for name in sorted(tensors):
        t = tensors[name]
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(_raw_bytes(t))
    return h.hexdigest()


def _write_error(path: Path, e: OSError, existed: bool) -> CheckpointError:
    what = os.strerror(e.errno) if e.errno else str(e)
    code = f" ({errno.errorcode[e.errno]})" if e.errno in errno.errorcode else ""
    kept = "the previous file is kept unchanged" if existed else "no file was written"
    return CheckpointError(f"could not write checkpoint {path}: {what}{code}; {kept}")


def save_checkpoint(path: str | os.PathLike, *, meta: dict, **groups: dict[str, torch.Tensor]) -> Path:
    """Atomically write tensor groups (e.g. model=..., ema=...) and a JSON `meta` dict to `path`. A tensor
    holding NaN or infinity is refused (CheckpointError naming it) and nothing is written; a failed write (a
    full disk) raises CheckpointError in one line and leaves the previous file as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for name, group in groups.items():
        if group:
            tensors.update(_flatten(name, group))
    bad = first_non_finite(tensors)
    if bad is not None:
        raise CheckpointError(f"refusing to write checkpoint {path}: tensor {bad!r} holds NaN or infinite values")
    doc = json.dumps({"format_version": FORMAT_VERSION, "groups": sorted(groups), **meta})
    metadata = {META_KEY: doc, CHECKSUM_KEY: checksum(doc, tensors)}
    existed = path.exists()
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=TMP_SUFFIX, dir=path.parent)
        os.close(fd)
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise _write_error(path, e, existed) from e
        raise
    return path


def remove_stale_temp_files(folder: str | os.PathLike) -> tuple[int, int]:
    """Delete the temporary files that killed checkpoint writes left in `folder` (call it only while no other
    process writes there, e.g. under the run lock). Returns (files, bytes) removed."""
    count = size = 0
    for p in Path(folder).glob(f"*.safetensors.*{TMP_SUFFIX}"):
        try:
            n = p.stat().st_size
            p.unlink()
        except FileNotFoundError:
            continue
        count, size = count + 1, size + n
    return count, size


def _siblings(path: Path) -> str:
    others = sorted(p.name for p in path.parent.glob("*.safetensors") if p.name != path.name)
    if not others:
        return "no other checkpoint is in that folder: retrain"
    return f"use another checkpoint of that folder ({', '.join(others)})"


def _parse_meta(raw: str | None, path: Path) -> dict:
    if raw is None:
        raise CheckpointError(f"{path} is a safetensors file but not a torchdiffusion checkpoint (no metadata)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint {path} has corrupted metadata ({e}); {_siblings(path)}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint {path} has corrupted metadata (not a mapping); {_siblings(path)}")
    version = meta_field(meta, "format_version", int, path, default=0)
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path} was written by a newer torchdiffusion (format {version})")
    return meta


def _resolve(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.is_dir():
        candidate = path / "last.safetensors"
        if not candidate.exists():
            raise CheckpointError(f"{path} is a folder without last.safetensors; pass a checkpoint file")
        path = candidate
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    return path


def read_meta(path: str | os.PathLike) -> dict:
    """The metadata document of a checkpoint alone (no tensors read, no checksum verified)."""
    path = _resolve(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"cannot read checkpoint {path}: the file is truncated or corrupted ({e})") from None
    return _parse_meta(raw, path)


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[dict, dict]:
    """Read a checkpoint: returns (meta, {group: {name: tensor}}). The checksum (when the file has one) and the
    finiteness of every floating-point tensor are verified; any problem raises CheckpointError with advice."""
    path = _resolve(path)
    try:
        tensors = load_file(str(path), device="cpu")
        with safe_open(str(path), framework="pt") as f:
            stored = f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"cannot read checkpoint {path}: the file is truncated or corrupted ({e}); "
                              f"{_siblings(path)}") from None
    meta = _parse_meta(stored.get(META_KEY), path)
    if CHECKSUM_KEY in stored and checksum(stored[META_KEY], tensors) != stored[CHECKSUM_KEY]:
        raise CheckpointError(f"checkpoint {path} is corrupted: its checksum does not match its contents (bit rot "
                              f"or an edit); {_siblings(path)}")
    bad = first_non_finite(tensors)
    if bad is not None:
        raise CheckpointError(f"checkpoint {path} holds NaN or infinite values in tensor {bad!r} (the run had "
                              f"diverged); {_siblings(path)}")
    names = meta_field(meta, "groups", list, path, default=[])
    if not all(isinstance(g, str) for g in names):
        raise CheckpointError(f"{path}: the metadata field 'groups' must be a list of strings, got {names!r:.80}")
    groups = {g: {k: v.to(device) for k, v in _unflatten(g, tensors).items()} for g in names}
    return meta, groups
