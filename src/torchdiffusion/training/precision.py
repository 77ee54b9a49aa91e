"""train.precision: auto: time this machine's fp32 and bf16 on the run's own training step and keep the faster.

The speed of bf16 against fp32 depends on the processor far more than on the model: bf16 autocast is about twice
as fast as fp32 where the CPU has bf16 matmul instructions (AVX512-BF16, AMX) or on a recent GPU, half as fast
where oneDNN emulates part of it, and two orders of magnitude slower where it has none (AVX2 only), where a single
bf16 training step can take minutes. So ``auto`` decides in two stages, both time-boxed:

1. a micro-probe: a matmul at the network's typical width in each dtype (milliseconds). bf16 more than
   :data:`BF16_MICRO_SLOWDOWN` times slower there means fp32, without running a bf16 training step;
2. otherwise a step probe: a few forward + backward passes of the run's objective on a deep copy of the module
   and objective, with throwaway generators and the global random stream forked, in fp32 and then in bf16,
   within :data:`STEP_BUDGET_S` seconds in all (a bf16 step predicted to overrun what is left is not run).
   The run's weights, optimizer, EMA and random streams are untouched, so training is bitwise what it would
   have been with the chosen dtype forced.

The decision is cached per machine, torch version, device, thread count and model shape in
``cache_dir()/precision.json`` (a damaged file is ignored and rewritten); the trainer records the resolved
dtype in each checkpoint, so a continued run keeps it without probing again.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import to_dict
from ..data import cache_dir
from ..data.cache import write_atomic
from ..utils import sample_generators

AUTO = "auto"
DTYPES = ("fp32", "bf16")            # what a run trains in; auto resolves to one of them
PRECISIONS = (AUTO, *DTYPES)         # the values of train.precision
BF16_MICRO_SLOWDOWN = 2.0            # bf16 matmul more than this many times slower than fp32: fp32, no step probe
BF16_MIN_SPEEDUP = 1.05              # bf16 is chosen only if its step is at least this many times faster
STEP_BUDGET_S = 10.0                 # wall time of the whole step probe (both dtypes, warm-ups included)
STEP_CALLS = 3                       # timed steps per dtype after one warm-up (fewer when the budget runs out)
MICRO_ROWS = 256                     # rows of the micro-probe's matmul (MICRO_ROWS, w) @ (w, w)
MICRO_WIDTHS = (32, 512)             # the network's typical width w, clamped to this range
MICRO_CALLS = 10                     # timed matmuls per dtype after one warm-up
MICRO_BUDGET_S = 0.5                 # wall time of the micro-probe per dtype
PROBE_SEED = 0x5EED                  # the throwaway generators of the probe's batch and objective
CACHE_FILE = "precision.json"        # in cache_dir()
CACHE_FORMAT = 1
CACHE_MAX_ENTRIES = 256              # the oldest decisions are dropped beyond this many
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")  # /proc/cpuinfo flags bf16 speed hangs on
# the configuration sections a step's cost depends on (every key under them enters the cache key)
SHAPE_KEYS = ("task", "model", "diffusion", "distill", "autoencoder_loss", "text.objective", "text.loss",
              "data.seq_len", "data.image_size", "train.channels_last")
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TIME_KEYS = ("matmul_fp32", "matmul_bf16", "step_fp32", "step_bf16")  # the measured times, in log order

clock = time.perf_counter            # the probe's clock (a module attribute, so that tests can replace it)


@dataclass
class Decision:
    """What train.precision resolved to and why: `how` is forced, resumed, cache, micro-probe or step-probe;
    `times` the measured seconds (matmul_fp32, matmul_bf16: one micro-probe matmul; step_fp32, step_bf16: one
    forward + backward; probe_s: the whole probe)."""

    precision: str                   # fp32 or bf16
    how: str                         # forced, resumed, cache, micro-probe or step-probe
    times: dict = field(default_factory=dict)
    note: str = ""                   # e.g. where the decision was cached, or why it was not

    def describe(self) -> str:
        """One log line: the choice, and the measured times or the source it came from."""
        if self.how == "forced":
            return f"train.precision {self.precision}"
        if self.how == "resumed":
            return f"train.precision auto: {self.precision} (recorded in the checkpoint this run continues)"
        times = ", ".join(f"{k} {_seconds(self.times[k])}" for k in TIME_KEYS if k in self.times)
        where = "cached decision" if self.how == "cache" else f"{self.how} of {_seconds(self.times['probe_s'])}"
        notes = "".join(f"; {n}" for n in (_why(self.times), self.note) if n)
        return f"train.precision auto: {self.precision} ({where}: {times}{notes})"


def _seconds(s: float) -> str:
    """A duration for the log line: '1.5 s' or '87.9 ms'."""
    return f"{s:.3g} s" if s >= 1 else f"{s * 1e3:.3g} ms"


def _why(times: dict) -> str:
    """Why no bf16 step was timed, if none was (the micro-probe, or the time box); '' otherwise."""
    if "step_bf16" in times or "matmul_bf16" not in times:
        return ""
    ratio = times["matmul_bf16"] / max(times["matmul_fp32"], 1e-12)
    if ratio > BF16_MICRO_SLOWDOWN:
        return f"bf16 matmul {ratio:.3g}x slower, over {BF16_MICRO_SLOWDOWN:g}x: no step timed"
    return f"a bf16 step, predicted from fp32's, would overrun the {STEP_BUDGET_S:g} s box: not timed"


def autocast(device: torch.device, precision: str):
    """The context a training forward runs in: bf16 autocast (fp32 master weights) or nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA and other asynchronous devices), so that a clock reading counts it."""
    backend = getattr(torch, torch.device(device).type, None)
    if torch.device(device).type != "cpu" and hasattr(backend, "synchronize"):
        backend.synchronize()


def measure(fn, device: torch.device, *, calls: int, budget_s: float) -> float:
    """Seconds of one call of `fn`: the fastest of up to `calls` timed calls after one warm-up call, stopping
    before a call that would end past `budget_s` (counted from the warm-up's start); the warm-up's own time when
    no timed call fits."""
    start = clock()
    fn()
    _sync(device)
    last = best = clock() - start
    for i in range(calls):
        if clock() - start + last > budget_s:
            break
        t0 = clock()
        fn()
        _sync(device)
        last = clock() - t0
        best = last if i == 0 else min(best, last)
    return best


def typical_width(net: torch.nn.Module) -> int:
    """The median inner dimension of the network's matmuls (a Linear's in_features, a convolution's
    in_channels / groups times its kernel size), clamped to MICRO_WIDTHS."""
    widths = []
    for m in net.modules():
        if isinstance(m, torch.nn.Linear):
            widths.append(m.in_features)
        elif isinstance(m, torch.nn.modules.conv._ConvNd):
            widths.append(m.in_channels // m.groups * math.prod(m.kernel_size))
    w = sorted(widths)[len(widths) // 2] if widths else MICRO_WIDTHS[1]
    return max(MICRO_WIDTHS[0], min(MICRO_WIDTHS[1], w))


def micro_probe(device: torch.device, width: int) -> dict[str, float]:
    """Seconds of one (MICRO_ROWS, width) @ (width, width) matmul in fp32 and in bf16 on `device`."""
    g = torch.Generator().manual_seed(PROBE_SEED)
    a, b = torch.randn(MICRO_ROWS, width, generator=g), torch.randn(width, width, generator=g)
    out = {}
    for name in DTYPES:
        x, y = (t.to(device=device, dtype=TORCH_DTYPES[name]) for t in (a, b))
        out[name] = measure(lambda: x @ y, device, calls=MICRO_CALLS, budget_s=MICRO_BUDGET_S)
    return out


def step_function(module: torch.nn.Module, objective, x0: torch.Tensor, cond: dict, device: torch.device, **kwargs):
    """`step(precision)`: one forward + backward of `objective` on a micro-batch, run on deep copies of the module
    and the objective (in train mode) with generators seeded by PROBE_SEED, so nothing of the run changes; the
    copies' gradients are dropped after each pass."""
    module, objective = copy.deepcopy((module, objective))
    module.train()
    n = len(x0)

    def step(precision: str) -> None:
        with autocast(device, precision):
            loss = objective(module, x0, cond, generator=sample_generators(PROBE_SEED, n), **kwargs)
        loss.backward()
        module.zero_grad(set_to_none=True)

    return step


def step_probe(step, device: torch.device, *, bf16_ratio: float, budget_s: float = STEP_BUDGET_S) -> dict:
    """Seconds of one training step in fp32, then in bf16: the bf16 step is run only if a warm-up and one timed
    step, predicted as fp32's step times `bf16_ratio` (bf16 matmul time over fp32's), fit in what is left of
    `budget_s`. Returns {'step_fp32': s} or {'step_fp32': s, 'step_bf16': s}."""
    start = clock()
    times = {"step_fp32": measure(lambda: step("fp32"), device, calls=STEP_CALLS, budget_s=budget_s / 2)}
    left = budget_s - (clock() - start)
    if 2 * times["step_fp32"] * bf16_ratio <= left:
        times["step_bf16"] = measure(lambda: step("bf16"), device, calls=STEP_CALLS, budget_s=left)
    return times


def bf16_matmul_too_slow(times: dict) -> bool:
    """Whether the micro-probe's bf16 matmul took more than BF16_MICRO_SLOWDOWN times fp32's."""
    return times["matmul_bf16"] > BF16_MICRO_SLOWDOWN * times["matmul_fp32"]


def choose(times: dict) -> tuple[str, str]:
    """(precision, how) from measured times: fp32 when the micro-probe's bf16 matmul is more than
    BF16_MICRO_SLOWDOWN times slower or no bf16 step was timed; else bf16 if its step is at least
    BF16_MIN_SPEEDUP times faster (at a near tie fp32 keeps its precision)."""
    if bf16_matmul_too_slow(times):
        return "fp32", "micro-probe"
    if "step_bf16" not in times:
        return "fp32", "step-probe"
    return ("bf16" if times["step_bf16"] * BF16_MIN_SPEEDUP < times["step_fp32"] else "fp32"), "step-probe"


def _forked_rng(device: torch.device):
    """A fork of the CPU random stream and, on an accelerator, of that device's stream: restored on exit."""
    if device.type == "cpu":
        return torch.random.fork_rng(devices=[])
    backend = getattr(torch, device.type)
    index = device.index if device.index is not None else getattr(backend, "current_device", lambda: 0)()
    return torch.random.fork_rng(devices=[index], device_type=device.type)


def probe(make_step, device: torch.device, width: int) -> Decision:
    """Run the micro-probe and, unless it settles the matter, the step probe on the step function `make_step()`
    builds, all on a fork of the global random stream (the run's stream is left where it was)."""
    device = torch.device(device)
    start = clock()
    with _forked_rng(device):
        micro = micro_probe(device, width)
        times = {"matmul_fp32": micro["fp32"], "matmul_bf16": micro["bf16"]}
        if not bf16_matmul_too_slow(times):
            ratio = times["matmul_bf16"] / max(times["matmul_fp32"], 1e-12)
            times.update(step_probe(make_step(), device, bf16_ratio=ratio))
    times["probe_s"] = clock() - start
    return Decision(*choose(times), times=times)


def machine_name(device: torch.device) -> str:
    """The processor the dtype speed depends on: a GPU's name, or the CPU's model name, family and model
    numbers and bf16-relevant instruction flags from /proc/cpuinfo (platform.processor() elsewhere)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    info = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    if not info:
        return f"{platform.processor() or platform.machine()} ({device.type})"
    flags = [f for f in CPU_FLAGS if f in info.get("flags", "").split()]
    return (f"{info.get('model name', platform.machine())} (family {info.get('cpu family', '?')} model "
            f"{info.get('model', '?')}; {' '.join(flags) or 'no avx2'})")


def _flatten(d: dict, prefix: str = "") -> dict:
    """{'a.b': value} from nested dictionaries."""
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def run_shape(cfg, micro_batch: int, data_shape) -> dict:
    """What a step's relative dtype speed depends on in a run: the configuration sections of SHAPE_KEYS, the
    micro-batch size and the shape of one example."""
    flat = _flatten(to_dict(cfg))
    keep = {k: v for k, v in flat.items() if any(k == p or k.startswith(p + ".") for p in SHAPE_KEYS)}
    return {"config": keep, "micro_batch": int(micro_batch), "data_shape": list(data_shape)}


def cache_key(device: torch.device, shape: dict) -> tuple[str, str]:
    """(key, machine): a hash of the machine, torch version, device, thread count and run shape."""
    machine = machine_name(device)
    parts = {"machine": machine, "torch": torch.__version__, "device": torch.device(device).type,
             "threads": torch.get_num_threads(), "shape": shape}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24], machine


def cache_path() -> Path:
    """Where decisions are kept: cache_dir()/precision.json ($TORCHDIFFUSION_CACHE overrides the folder)."""
    return cache_dir() / CACHE_FILE


def read_cache(path: Path) -> dict:
    """The valid decisions of the cache file {key: entry}; a missing, unreadable or damaged file (or entry)
    counts as none."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):  # missing, unreadable, not UTF-8 or not JSON
        return {}
    entries = data.get("decisions") if isinstance(data, dict) and data.get("format") == CACHE_FORMAT else None
    if not isinstance(entries, dict):
        return {}
    return {k: e for k, e in entries.items() if isinstance(e, dict) and e.get("precision") in DTYPES
            and isinstance(e.get("times"), dict) and all(isinstance(v, (int, float)) for v in e["times"].values())}


def write_cache(path: Path, key: str, machine: str, decision: Decision) -> None:
    """Add `decision` under `key` to the cache file (atomically; valid earlier entries kept, the oldest dropped
    beyond CACHE_MAX_ENTRIES)."""
    entries = read_cache(path)
    entries.pop(key, None)
    entries[key] = {"precision": decision.precision, "how": decision.how, "times": decision.times,
                    "machine": machine, "torch": torch.__version__}
    entries = dict(list(entries.items())[-CACHE_MAX_ENTRIES:])
    text = json.dumps({"format": CACHE_FORMAT, "decisions": entries}, indent=1)
    write_atomic(path, lambda f: f.write(text.encode()))


def resolve_auto(make_step, device: torch.device, width: int, shape: dict, *, path: Path | None = None) -> Decision:
    """train.precision auto on this machine: the cached decision for (machine, torch, device, threads, shape),
    else a probe (`make_step()` builds the step function, only if the micro-probe leaves it open), whose
    decision is cached. A cache that
    cannot be written is noted in the decision, never an error."""
    path = cache_path() if path is None else Path(path)
    key, machine = cache_key(device, shape)
    hit = read_cache(path).get(key)
    if hit is not None:
        return Decision(hit["precision"], "cache", times=dict(hit["times"]), note=f"from {path}")
    decision = probe(make_step, device, width)
    try:
        write_cache(path, key, machine, decision)
        decision.note = f"cached in {path}"
    except OSError as e:
        decision.note = f"not cached ({e.strerror or e})"
    return decision
