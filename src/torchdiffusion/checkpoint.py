"""Checkpoints as safetensors + JSON, written atomically, never loaded with pickle.

A checkpoint is one ``.safetensors`` file: tensors under prefixes (``model.``, ``ema.``, ``optim.``, ``rng.``)
and a JSON document in its metadata (key ``torchdiffusion``) holding the run configuration, the step, the
optimizer's hyperparameters, the data-order state and anything else that is not a tensor. Writing goes to a
temporary file in the same folder, flushed and fsync'ed, then renamed over the target, so a crash leaves
either the old file or the new one, never half of one.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

META_KEY = "torchdiffusion"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, corrupted or not a torchdiffusion checkpoint."""


def _flatten(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v.detach().contiguous().cpu() for k, v in state.items()}


def _unflatten(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    p = prefix + "."
    return {k[len(p):]: v for k, v in tensors.items() if k.startswith(p)}


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


def optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    for key, v in meta.get("scalars", {}).items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(path: str | os.PathLike, *, meta: dict, **groups: dict[str, torch.Tensor]) -> Path:
    """Atomically write tensor groups (e.g. model=..., ema=...) and a JSON `meta` dict to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for name, group in groups.items():
        if group:
            tensors.update(_flatten(name, group))
    doc = json.dumps({"format_version": FORMAT_VERSION, "groups": sorted(groups), **meta})
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={META_KEY: doc})
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[dict, dict]:
    """Read a checkpoint: returns (meta, {group: {name: tensor}}). Raises CheckpointError with advice."""
    path = Path(path)
    if path.is_dir():
        candidate = path / "last.safetensors"
        if not candidate.exists():
            raise CheckpointError(f"{path} is a folder without last.safetensors; pass a checkpoint file")
        path = candidate
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        tensors = load_file(str(path), device=str(device))
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(
            f"cannot read checkpoint {path}: the file is truncated or corrupted ({e}). "
            "Use another checkpoint (e.g. best.safetensors or an older step) or retrain."
        ) from None
    if raw is None:
        raise CheckpointError(f"{path} is a safetensors file but not a torchdiffusion checkpoint (no metadata)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint {path} has corrupted metadata: {e}") from None
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path} was written by a newer torchdiffusion (format {meta['format_version']})")
    groups = {g: _unflatten(g, tensors) for g in meta.get("groups", [])}
    return meta, groups
