"""Small helpers shared across the library: broadcasting, random numbers, validation."""
from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Iterable, Sequence

import torch


def append_dims(x: torch.Tensor, target_dims: int) -> torch.Tensor:
    """Append trailing singleton dimensions so that `x` broadcasts against a tensor of `target_dims` dims."""
    missing = target_dims - x.ndim
    if missing < 0:
        raise ValueError(f"input has {x.ndim} dims but target_dims is {target_dims}, which is smaller")
    return x[(...,) + (None,) * missing]


def check_choice(name: str, value, allowed: Iterable):
    """Raise a ValueError naming the allowed values when `value` is not one of them."""
    allowed = list(allowed)
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; allowed values: {', '.join(map(repr, allowed))}")
    return value


def randn(shape: Sequence[int], *, generator=None, device=None, dtype=None) -> torch.Tensor:
    """Standard normal noise of `shape`.

    `generator` is None, one `torch.Generator`, or a list of generators, one per sample along the first
    dimension. With one generator per sample, sample i receives the same noise whatever the batch size,
    so outputs do not depend on how a job is batched.
    """
    return _draw(torch.randn, shape, generator, device, dtype)


def _draw(fn, shape, generator, device, dtype):
    """Call torch.randn/rand on the generator's device (one draw, or one per sample), then move to `device`."""
    dtype = dtype or torch.get_default_dtype()
    if generator is None:
        return fn(tuple(shape), device=device, dtype=dtype)
    if isinstance(generator, torch.Generator):
        return fn(tuple(shape), generator=generator, device=generator.device, dtype=dtype).to(device)
    gens = list(generator)
    if len(gens) != shape[0]:
        raise ValueError(f"got {len(gens)} generators for a batch of {shape[0]}; pass one per sample")
    return torch.stack([fn(tuple(shape[1:]), generator=g, device=g.device, dtype=dtype) for g in gens]).to(device)


def randn_like(x: torch.Tensor, *, generator=None) -> torch.Tensor:
    return randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def rand(shape: Sequence[int], *, generator=None, device=None, dtype=None) -> torch.Tensor:
    """Uniform [0, 1) numbers; `generator` as in :func:`randn`."""
    return _draw(torch.rand, shape, generator, device, dtype)


def sample_generators(seed: int, n: int, *, offset: int = 0, device="cpu") -> list[torch.Generator]:
    """One generator per sample: sample i is seeded with (seed, offset + i), independent of batching."""
    gens = []
    for i in range(offset, offset + n):
        g = torch.Generator(device=device)
        g.manual_seed(hash_seed(seed, i))
        gens.append(g)
    return gens


def hash_seed(*parts: int) -> int:
    """Combine integers into one 63-bit seed (splitmix64 mixing), so nearby seeds give unrelated streams."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) & 0xFFFFFFFFFFFFFFFF
        h = (h + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        z = h
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        h = z ^ (z >> 31)
    return h & 0x7FFFFFFFFFFFFFFF


def as_sigma(sigma, batch: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """Turn a float or a 0-d/1-d tensor into a (batch,) float tensor of noise levels."""
    s = torch.as_tensor(sigma, device=device, dtype=dtype)
    if s.ndim == 0:
        s = s.expand(batch)
    if s.shape != (batch,):
        raise ValueError(f"sigma must be a scalar or have shape ({batch},), got {tuple(s.shape)}")
    return s


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation between two tensors of the same shape (per sample along dim 0)."""
    af, bf = a.flatten(1), b.flatten(1)
    cos = (af * bf).sum(1) / (af.norm(dim=1) * bf.norm(dim=1)).clamp_min(1e-12)
    omega = torch.acos(cos.clamp(-1 + 1e-7, 1 - 1e-7))
    so = torch.sin(omega)
    wa = torch.sin((1 - t) * omega) / so
    wb = torch.sin(t * omega) / so
    return append_dims(wa, a.ndim) * a + append_dims(wb, a.ndim) * b


LOG2 = math.log(2.0)


def file_sha256(path) -> str:
    """SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


_FILE_HASHES: dict = {}  # (resolved path, size, mtime) -> sha256: each version of a file is hashed once


def cached_file_sha256(path) -> str:
    """:func:`file_sha256`, computed once per (path, size, modification time)."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _FILE_HASHES:
        _FILE_HASHES[key] = file_sha256(p)
    return _FILE_HASHES[key]
