"""The trainer: AdamW, warm-up + cosine learning rate (over train.steps, or over the time budget train.max_minutes:
train.lr_schedule_over), gradient clipping, EMA, mixed precision, checkpoints.

It holds no diffusion math: each step is ``loss = objective(module, x0, cond)`` with the module and objective
that :mod:`torchdiffusion.build` makes for the run's task. A run lives in ``out_dir/name``: ``config.yaml``,
``checkpoints/{last,best}.safetensors`` (and the ``train.keep_last`` earlier lasts as ``step_<step>.safetensors``)
and ``logs/`` (JSON lines and a TensorBoard event file); pictures and evaluations come from hooks (:class:`Hook`,
e.g. :func:`torchdiffusion.app.hooks.standard_hooks`), so the trainer imports neither.

Starting a run whose folder holds a checkpoint of the same configuration continues it exactly: same data order,
same random streams, same weights as a run that was never interrupted. That holds after a stop by Ctrl-C or
SIGTERM too: the loop reads the signal at a clean point (the step in progress, its log line, hooks and due
checkpoint done) and saves there (:class:`~torchdiffusion.training.guard.StopSignals`); hooks and validation
run on a copy of the random stream, so they never shift training. While it trains, a process holds the run
folder's lock (:class:`~torchdiffusion.training.guard.RunLock`). A step whose gradient norm (or, in one
process, loss) is NaN or infinite updates nothing; more than ``train.nonfinite_skips`` of them in a row stop
the run with :class:`NonFiniteLossError`, without writing a checkpoint.
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from tqdm.auto import tqdm

from ..build import (build_dataset, build_module, build_objective, build_schedule, net_input_shape, num_classes,
                     task_of)
from ..checkpoint import (CheckpointError, check_tensors, load_checkpoint, meta_field, optimizer_from_flat,
                          optimizer_to_flat, read_meta, remove_stale_temp_files, save_checkpoint)
from ..config import RunConfig, dump_config, to_dict, upgrade_config, validate
from ..data import EpochSampler
from ..utils import check_choice, hash_seed, sample_generators
from .distributed import (all_mean, any_flag, barrier, broadcast_flag, init_distributed, is_peer_failure,
                          per_rank_batch, wrap_ddp)
from .guard import RunLock, RunLockError, StopSignals, describe_holder
from .precision import (AUTO, DTYPES, PRECISIONS, PROBE_SEED, Decision, autocast, resolve_auto, run_shape,
                        step_function, typical_width)
from .tracking import ScalarWriter, read_metrics, rewrite_metrics

LR_SCHEDULES = ("cosine", "constant")
# fields that may change between a run and its continuation; every other field must match
RESUMABLE_CHANGES = {"name", "out_dir", "sample", "train.steps", "train.max_minutes", "train.log_every",
                     "train.sample_every", "train.ckpt_every", "train.threads", "train.grad_accum",
                     "train.compile", "train.eval_every", "train.eval_samples", "train.keep_last",
                     "train.nonfinite_skips", "train.dist_timeout_s",
                     "distill.teacher",  # a teacher file may move: the task checks its hash instead
                     "text.sample"}  # a text run's generate-text defaults
LAST = "last.safetensors"
KEPT = "step_{:07d}.safetensors"  # an earlier last, kept when a newer one replaces it (train.keep_last)
LOG_LINE_EVERY_S = 15             # without a progress bar, a status line at most this often
VAL_SEED = 0xFA11                 # the generators of the validation batch (data draws, objective's own levels)


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss or gradient more often in a row than train.nonfinite_skips."""


class PeerFailure(RuntimeError):
    """Another data-parallel process died, froze or stopped answering within train.dist_timeout_s."""


class _StopRequested(KeyboardInterrupt):
    """A stop signal reached the loop at a clean point (saved there, then raised on as a KeyboardInterrupt)."""


class Hook:
    """Something the trainer runs on the main process, with the network in eval mode: ``__call__(trainer)`` at
    every step that is a multiple of `every` (0: never during training), returning scalars to log (or None), and
    ``end(trainer)`` once after the run. Subclasses override what they need."""

    every: int = 0

    def __call__(self, trainer: "Trainer") -> dict | None:
        return None

    def end(self, trainer: "Trainer") -> None:
        return None


class EMA:
    """Exponential moving average of a module's floating-point parameters and buffers.

    decay_k = min(decay, (1 + k) / (10 + k)) at update k, so early averages are not dominated by the random
    initialisation. Updated in place with one fused foreach lerp per call.
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.updates = 0
        self._cached = None  # (source module, dst tensors, src tensors): state_dict() once, not every step

    def _pairs(self, model: nn.Module):
        if self._cached is None or self._cached[0] is not model:
            src = [t for t in model.state_dict().values() if t.is_floating_point()]
            dst = [t for t in self.model.state_dict().values() if t.is_floating_point()]
            self._cached = (model, dst, src)
        return self._cached[1], self._cached[2]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        dst, src = self._pairs(model)
        torch._foreach_lerp_(dst, src, 1.0 - d)
        self.updates += 1


def lr_at(step: int, cfg) -> float:
    """The learning rate of step `step` (from 0) over train.steps (train.lr_schedule_over=steps): linear warm-up to
    cfg.lr over warmup_steps, then the decay of `_decay` over the remaining steps."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    return _decay(min(1.0, (step - cfg.warmup_steps) / span), cfg)


def lr_at_fraction(fraction: float, cfg) -> float:
    """The learning rate at `fraction` of the time budget (train.lr_schedule_over=time; `fraction` is the elapsed
    training time over 60 * max_minutes, see Trainer.train_seconds): linear warm-up from 0 to cfg.lr over the first
    w = warmup_steps / steps of the budget (the share of the steps that lr_at warms up over), then the decay of
    `_decay` over the rest, which reaches min_lr_ratio * lr at fraction 1 and stays there."""
    w = min(1.0, cfg.warmup_steps / cfg.steps)
    if fraction < w:
        return cfg.lr * max(0.0, fraction) / w
    return _decay(1.0 if w >= 1.0 else min(1.0, (fraction - w) / (1.0 - w)), cfg)


def _decay(progress: float, cfg) -> float:
    """The learning rate after warm-up at `progress` in [0, 1] of the decay: cosine from lr to min_lr_ratio * lr
    (Loshchilov & Hutter 2017, "SGDR", eq. 5 without restarts), or lr throughout (lr_schedule constant)."""
    if cfg.lr_schedule == "constant":
        return cfg.lr
    floor = cfg.min_lr_ratio * cfg.lr
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def _flat_config(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat_config(v, key + "."))
        else:
            out[key] = v
    return out


def config_differences(a: dict, b: dict) -> list[str]:
    """Keys whose values differ and that a continuation may not change. A key missing from either side (a run
    saved before that field existed) counts as its default value."""
    defaults = _flat_config(to_dict(RunConfig()))
    fa, fb = {**defaults, **_flat_config(a)}, {**defaults, **_flat_config(b)}
    diffs = []
    for k in sorted(set(fa) | set(fb)):
        if fa.get(k) != fb.get(k) and not any(k == p or k.startswith(p + ".") for p in RESUMABLE_CHANGES):
            diffs.append(f"{k}: {fa.get(k)!r} -> {fb.get(k)!r}")
    return diffs

class _LossWindow:
    """The training losses since the last log line, summed on the device (no host sync before the log step)."""

    def __init__(self, device: torch.device):
        self.sum = torch.zeros((), device=device)
        self.n, self.steps, self.since = 0, 0, time.time()
        self.last_line = 0.0  # when the last status line was printed

    def add(self, loss: torch.Tensor, counted: bool) -> None:
        """One step; its loss enters the mean unless the step was skipped (`counted` False)."""
        if counted:
            self.sum += loss
            self.n += 1
        self.steps += 1

    def reset(self, now: float) -> None:
        self.sum.zero_()
        self.n, self.steps, self.since = 0, 0, now


class Trainer:
    """Train the configured model on the configured data. `fit()` runs to cfg.train.steps (or max_minutes)."""

    clock = staticmethod(time.perf_counter)  # seconds; times the steps (train_seconds); a test may replace it
    CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}  # train.clock -> the clock of train_seconds

    def __init__(self, cfg: RunConfig, *, dataset=None, resume: bool = True, progress: bool | None = None,
                 log_lines: bool = False, device: str | torch.device | None = None, hooks=()):
        t = validate(cfg).train
        if t.clock != "wall":
            self.clock = self.CLOCKS[t.clock]
        check_choice("train.precision", t.precision, PRECISIONS)
        check_choice("train.lr_schedule", t.lr_schedule, LR_SCHEDULES)
        self.cfg, self.task, self.hooks = cfg, task_of(cfg), list(hooks)
        # data parallel under torchrun (a single process otherwise): rank 0 validates, samples, logs, saves
        self.dist = init_distributed(timeout_s=t.dist_timeout_s)
        self.local_batch = per_rank_batch(t.batch_size, self.dist, t.grad_accum)
        self.device = torch.device(device) if device is not None else self.dist.device()
        self.run_dir = cfg.run_dir
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.progress = (sys.stderr.isatty() if progress is None else progress) and self.dist.is_main
        self.log_lines = log_lines  # without a progress bar, print a status line every LOG_LINE_EVERY_S
        if t.threads > 0:
            torch.set_num_threads(t.threads)
        self.data = dataset if dataset is not None else build_dataset(cfg, "train", progress=self.progress)
        if self.task.configure is not None:  # e.g. a text run's vocabulary comes from its tokeniser
            self.cfg = cfg = self.task.configure(cfg, self.data)
        self._check_data_matches_model()
        task_val = self.task.validation
        self.val = self._validation_batch() if task_val is None else task_val(cfg, self.data)
        self._build_parts()
        self.step, self.best_val, self.resumed_from = 0, math.inf, None
        self.nonfinite_in_a_row = 0  # consecutive skipped steps (train.nonfinite_skips)
        self.skipped_last_step = False
        self.train_seconds = 0.0     # elapsed training time of the run, all its continuations (_timed_step)
        self._last_on_disk = None    # the step of checkpoints/last.safetensors, when this run knows it
        self._stop = StopSignals()   # replaced by an installed one while fit() runs
        self.lock = None
        self._recorded_precision = None  # the dtype the checkpoint a continued run starts from trained in
        self._commit()
        self._open_run(resume)
        self.precision = self._resolve_precision()  # fp32 or bf16 (train.precision auto resolved)

    def _build_parts(self) -> None:
        """Schedule, module, objective, EMA, DDP / torch.compile wrappers, AdamW and the batch order."""
        cfg, t = self.cfg, self.cfg.train
        torch.manual_seed(hash_seed(t.seed, 0))  # initialisation
        self.schedule = build_schedule(cfg)
        self.module = build_module(cfg, schedule=self.schedule).to(self.device)
        if self.task.init is not None:  # e.g. a distilled student starts from its teacher's weights
            self.task.init(self.module, cfg)
        self.net = self.module.net
        if t.channels_last and self.is_image:
            self.net.to(memory_format=torch.channels_last)
        self.objective = build_objective(cfg, self.schedule)
        self.ema = EMA(self.net, t.ema_decay)
        self.ema_module = build_module(cfg, self.ema.model, self.schedule)
        # the training forward goes through DDP (gradient all-reduce) and torch.compile when enabled; the EMA,
        # validation and checkpoints use the plain module self.net, which shares the parameters
        self.ddp_net = wrap_ddp(self.net, self.dist)
        self._set_train_net(self._compiled(self.ddp_net) if t.compile else self.ddp_net)
        self._compile_pending = t.compile and self.train_net is not self.ddp_net
        self.opt = _adamw(self.net.parameters(), lr=t.lr, betas=tuple(t.adam_betas), weight_decay=t.weight_decay)
        self.sampler = EpochSampler(len(self.data), t.batch_size, seed=hash_seed(t.seed, 1), rank=self.dist.rank,
                                    world_size=self.dist.world_size)
        self._seed_dropout(0)

    # ------------------------------------------------------------------------------------------ setup
    @property
    def is_image(self) -> bool:
        return len(net_input_shape(self.cfg)) == 3

    @property
    def ema_denoiser(self):
        """The EMA weights wrapped like the trained module (a denoiser for task 'denoiser'), as the task samples
        it (a consistency student in its consistency function)."""
        serve = self.task.serve
        return serve(self.ema_module, self.cfg) if serve is not None else self.ema_module

    def _check_data_matches_model(self) -> None:
        want = net_input_shape(self.cfg)
        got = tuple(self.data.sample_shape)
        if want != got:
            kind = self.cfg.model.kind
            hint = (f"set model.{kind}.image_size / model.{kind}.in_channels, or data.image_size to resize"
                    if self.is_image else f"set model.{kind}.dim")
            raise ValueError(f"the data {self.cfg.data.dataset!r} has examples of shape {got} but the network "
                             f"expects {want}: {hint}")
        nc = num_classes(self.cfg)
        if nc is not None and getattr(self.data, "labels", None) is None:
            raise ValueError(f"the model is class-conditional ({nc} classes) but the data has no labels")

    def _validation_batch(self):
        """A fixed batch with fixed noise levels and noise: the loss on it picks the best checkpoint."""
        n = min(256, len(self.data))
        idx = torch.randperm(len(self.data), generator=torch.Generator().manual_seed(12345))[:n]
        x0, y, extra = self._batch(idx, generator=sample_generators(VAL_SEED, n))
        g = torch.Generator().manual_seed(54321)
        sigma = build_schedule(self.cfg).sample_sigmas(n, generator=g)
        noise = torch.randn(x0.shape, generator=g)
        return x0, y, sigma, noise, extra

    def _batch(self, indices, **kwargs) -> tuple:
        """(x0, labels or None, extra conditioning {name: (N, ...)}): a data set's batch may carry per-example
        inputs of the objective beside the labels (e.g. a reflow coupling's noise)."""
        out = self.data.batch(indices, **kwargs)
        return out[0], out[1], (out[2] if len(out) > 2 else {})

    def _seed_dropout(self, step: int) -> None:
        """Seed the global torch stream (dropout) per process; the data, augmentation and noise do not use it."""
        parts = (self.cfg.train.seed, 4) if self.dist.world_size == 1 else (self.cfg.train.seed, 4, self.dist.rank, step)
        torch.manual_seed(hash_seed(*parts))

    def _compiled(self, net: nn.Module) -> nn.Module:
        try:
            return torch.compile(net)
        except Exception as e:  # e.g. no C++ compiler, unsupported platform
            warnings.warn(f"train.compile: torch.compile failed ({type(e).__name__}: {e}); training eagerly")
            return net

    def _set_train_net(self, net: nn.Module) -> None:
        self.train_net = net
        self.train_module = build_module(self.cfg, net, self.schedule)

    def _cond(self, y):
        return {"class_labels": y} if num_classes(self.cfg) is not None else {}

    # ------------------------------------------------------------------------------------ the run folder
    def _open_run(self, resume: bool) -> None:
        """Rank 0 takes the run lock, deletes the temporary files of killed checkpoint writes and (resume=False)
        moves an earlier run aside; then every process continues from the run's newest checkpoint (resume)."""
        error = None
        if self.dist.is_main:
            try:
                self._lock_run(resume)
            except Exception as e:  # the other processes must learn of it rather than wait at the barrier
                error = e
        if broadcast_flag(error is not None, self.dist, self.device):
            raise error if error is not None else RunLockError(f"rank 0 could not open {self.run_dir}; see its error")
        source = self._resume_source() if resume else None
        if source is not None:
            self._resume(source)
        barrier(self.dist)

    def _lock_run(self, resume: bool) -> None:
        try:
            self.lock = RunLock.acquire(self.run_dir)
        except OSError as e:
            raise RunLockError(f"cannot create or lock the run folder {self.run_dir} ({e.strerror or e}); choose a "
                               "writable out_dir=...") from None
        if self.lock.stale:
            print(f"note: took over the lock of {self.run_dir} from a run that ended without releasing it "
                  f"({describe_holder(self.lock.stale)})", file=sys.stderr)
        files, size = remove_stale_temp_files(self.ckpt_dir)
        if files:
            print(f"note: deleted {files} temporary file(s) ({size / 1e6:.1f} MB) of interrupted checkpoint writes "
                  f"in {self.ckpt_dir}", file=sys.stderr)
        if not resume and self._checkpoint_files():
            self._move_aside()

    def _move_aside(self) -> None:
        """Start over, but keep the earlier run: rename its folder (the lock goes with it) and lock a new one."""
        aside = self.run_dir.with_name(f"{self.run_dir.name}.{time.strftime('%Y%m%d-%H%M%S')}")
        self.run_dir.rename(aside)
        self.lock.moved_to(aside)
        earlier, self.lock = self.lock, RunLock.acquire(self.run_dir)
        earlier.release()
        print(f"starting over: the earlier run in {self.run_dir} was moved to {aside}", file=sys.stderr)

    def close(self) -> None:
        """Give the run lock back (fit() does at its end)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _checkpoint_files(self) -> list[Path]:
        return sorted(self.ckpt_dir.glob("*.safetensors")) if self.ckpt_dir.is_dir() else []

    def _resume_source(self) -> Path | None:
        """last.safetensors; where it is missing (deleted after it was damaged), the newest other checkpoint of
        the run (best or a kept earlier last), with a notice; None for a new run."""
        last = self.ckpt_dir / LAST
        if last.exists():
            return last
        found = []
        for p in self._checkpoint_files():
            with contextlib.suppress(CheckpointError):
                found.append((meta_field(read_meta(p), "step", int, p), p))
        if not found:
            return None
        step, path = max(found)
        if self.dist.is_main:
            print(f"note: {self.ckpt_dir} has no {LAST}; continuing the run from {path.name} (step {step})",
                  file=sys.stderr)
        return path

    # ------------------------------------------------------------------------------------ checkpoints
    def _commit(self) -> None:
        """Record the data position and random stream of the last completed step: what a checkpoint stores,
        wherever the process is when it is written."""
        self._committed = (self.sampler.state_dict(), torch.get_rng_state())

    def _save(self, name: str) -> Path:
        opt_tensors, opt_meta = optimizer_to_flat(self.opt)
        data_position, rng = self._committed
        meta = {
            "config": to_dict(self.cfg),
            "step": self.step,
            "sampler": data_position,
            "optimizer": opt_meta,
            "best_val": None if math.isinf(self.best_val) else self.best_val,
            "ema_updates": self.ema.updates,
            "nonfinite_in_a_row": self.nonfinite_in_a_row,
            "precision": self.precision,
            "train_seconds": self.train_seconds,
            "data_shape": list(self.data.sample_shape),
            "world_size": self.dist.world_size,
            **({"data": self.data.meta} if hasattr(self.data, "meta") else {}),
            **(self.task.save_meta(self) if self.task.save_meta is not None else {}),
        }
        objective_state = self.objective.state_dict() if hasattr(self.objective, "state_dict") else {}
        if name == "last":
            self._keep_previous_last()
        try:  # the rng group: the dropout stream of rank 0; noise is seeded per step and example
            path = save_checkpoint(self.ckpt_dir / f"{name}.safetensors", meta=meta, model=self.net.state_dict(),
                                   ema=self.ema.model.state_dict(), optim=opt_tensors, rng={"torch": rng},
                                   objective=objective_state)
        except CheckpointError as e:
            raise self._save_error(e) from None
        if name == "last":
            self._last_on_disk = self.step
        return path

    def _save_error(self, e: CheckpointError) -> Exception:
        if isinstance(e.__cause__, OSError):
            return CheckpointError(f"step {self.step}: {e}; free some space (or fix the folder) and run the same "
                                   "command again to continue from the checkpoint on disk")
        return NonFiniteLossError(f"step {self.step}: {e}. {self._divergence_advice()}")

    def _keep_previous_last(self) -> None:
        """Before last.safetensors is replaced, keep it as step_<its step>.safetensors (a hard link, no copy) and
        delete the kept ones beyond the newest train.keep_last."""
        k, last = self.cfg.train.keep_last, self.ckpt_dir / LAST
        if k <= 0 or self._last_on_disk in (None, self.step) or not last.exists():
            return
        kept = self.ckpt_dir / KEPT.format(self._last_on_disk)
        if not kept.exists():
            try:
                os.link(last, kept)
            except OSError:  # no hard links on this file system
                try:
                    shutil.copyfile(last, kept)
                except OSError:
                    kept.unlink(missing_ok=True)
        for old in sorted(self.ckpt_dir.glob(KEPT.replace("{:07d}", "*")))[:-k]:
            old.unlink(missing_ok=True)

    def _read_checkpoint(self, path: Path) -> tuple[dict, dict]:
        """The checkpoint to continue from, with every field this run needs checked (one line naming it)."""
        try:
            meta, groups = load_checkpoint(path)
        except CheckpointError as e:
            others = [p.name for p in self._checkpoint_files() if p.name != path.name]
            advice = (f"delete {path.name} to continue from the newest of the others, or pass --no-resume"
                      if others else "pass --no-resume") + " to start over (the earlier run is moved aside)"
            raise CheckpointError(f"cannot continue the run in {self.run_dir}: {e}. To go on, {advice}") from None
        for name, kind in (("config", dict), ("step", int), ("sampler", dict), ("sampler.epoch", int),
                           ("sampler.position", int), ("optimizer", dict), ("best_val", (float, type(None))),
                           ("ema_updates", int)):
            meta_field(meta, name, kind, path)
        if meta["step"] < 0 or meta["ema_updates"] < 0:
            raise CheckpointError(f"{path}: the metadata fields 'step' and 'ema_updates' must not be negative")
        check_tensors("model", groups.get("model", {}), self.net.state_dict(), path)
        check_tensors("ema", groups.get("ema", {}), self.ema.model.state_dict(), path)
        rng = groups.get("rng", {}).get("torch")
        if rng is None or rng.dtype != torch.uint8 or rng.shape != torch.get_rng_state().shape:
            raise CheckpointError(f"{path}: tensor 'rng.torch' is missing or is not a torch generator state")
        return meta, groups

    def _resume(self, path: Path) -> None:
        meta, groups = self._read_checkpoint(path)
        diffs = config_differences(upgrade_config(meta["config"]), to_dict(self.cfg))
        if diffs:
            raise CheckpointError(
                f"{self.run_dir} holds a run with a different configuration ({'; '.join(diffs[:6])}). "
                "Choose another name=..., delete that folder, or pass --no-resume to start over in it.")
        if self.task.check_resume is not None:  # e.g. a student's teacher is still the same file
            self.task.check_resume(meta, self.cfg, path)
        opt_state = optimizer_from_flat(groups.get("optim", {}), meta["optimizer"], self.opt, path)
        try:
            self.sampler.load_state_dict(meta["sampler"])  # global position: any world size continues it
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from None
        self.net.load_state_dict(groups["model"])
        self.ema.model.load_state_dict(groups["ema"])
        self.ema.updates = meta["ema_updates"]
        self.opt.load_state_dict(opt_state)
        self._match_optimizer_layout()
        if hasattr(self.objective, "load_state_dict"):
            self.objective.load_state_dict(groups.get("objective", {}), self.module)
        self.step = meta["step"]
        self.nonfinite_in_a_row = meta_field(meta, "nonfinite_in_a_row", int, path, default=0)
        self._recorded_precision = meta_field(meta, "precision", str, path, default=None)
        if self._recorded_precision not in (None, *DTYPES):
            raise CheckpointError(f"{path}: the metadata field 'precision' is {self._recorded_precision!r}, not "
                                  f"one of {', '.join(DTYPES)}")
        self.train_seconds = meta_field(meta, "train_seconds", float, path, default=0.0)
        if self.dist.world_size == 1 and meta_field(meta, "world_size", int, path, default=1) == 1:
            torch.set_rng_state(groups["rng"]["torch"])
        else:  # dropout masks cannot follow a change of sharding: reseed per process
            self._seed_dropout(self.step)
        self.best_val = math.inf if meta["best_val"] is None else meta["best_val"]
        self.resumed_from = str(path)
        self._last_on_disk = self.step if path.name == LAST else None
        self._commit()

    def _match_optimizer_layout(self) -> None:
        """Give every optimizer state tensor its parameter's memory format: state read from a checkpoint is
        contiguous, and the fused AdamW pairs a channels-last parameter with a contiguous moment element by element
        in storage order, which mixes them up."""
        for group in self.opt.param_groups:
            for p in group["params"]:
                for k, v in self.opt.state.get(p, {}).items():
                    if torch.is_tensor(v) and v.shape == p.shape and v.ndim == 4 \
                            and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous():
                        self.opt.state[p][k] = v.contiguous(memory_format=torch.channels_last)

    # ----------------------------------------------------------------------------------------- pieces
    def autocast(self):
        """The context of the training forward: bf16 autocast or nothing, as train.precision resolved."""
        return autocast(self.device, self.precision)

    def _resolve_precision(self) -> str:
        """train.precision, auto resolved (training/precision.py): to the dtype the checkpoint this run continues
        recorded, else to rank 0's cached or probed choice, which every process takes; one line says why."""
        t = self.cfg.train
        if t.precision != AUTO:
            self.precision_decision = Decision(t.precision, "forced")
            return t.precision
        decision = None
        if self._recorded_precision is not None:
            decision = Decision(self._recorded_precision, "resumed")
        elif self.dist.is_main:
            micro = max(1, self.local_batch // t.grad_accum)
            decision = resolve_auto(lambda: self._probe_step(micro), self.device, typical_width(self.net),
                                    run_shape(self.cfg, micro, self.data.sample_shape))
        bf16 = broadcast_flag(decision is not None and decision.precision == "bf16", self.dist, self.device)
        self.precision_decision = decision
        if decision is not None:
            self._say(decision.describe())
        return "bf16" if bf16 else "fp32"

    def _probe_step(self, n: int):
        """The precision probe's step function: the objective's forward + backward on copies of the module and
        objective, on the first n examples (flipped and noised by throwaway generators) laid out as in training."""
        idx = torch.arange(n) % len(self.data)
        x0, y, extra = self._batch(idx, generator=sample_generators(PROBE_SEED, n), flip=self.cfg.data.flip,
                                   device=self.device)
        if self.cfg.train.channels_last and self.is_image:
            x0 = x0.contiguous(memory_format=torch.channels_last)  # (n, C, H, W)
        step = {"step": self.step} if getattr(self.objective, "takes_step", False) else {}
        return step_function(self.module, self.objective, x0, {**self._cond(y), **extra}, self.device, **step)

    def example_generators(self, n: int) -> list[torch.Generator]:
        """One generator per example of this process's n examples of the current global batch, seeded by (seed,
        step, position in the global batch): flips, noise levels and noise of an example do not depend on the
        world size or on gradient accumulation, and a resumed run draws what an uninterrupted one would."""
        return sample_generators(hash_seed(self.cfg.train.seed, 2, self.step), n, offset=self.dist.rank * n)

    def _gradients(self, indices) -> torch.Tensor:
        """Accumulate the gradient of the mean loss over `indices` in grad_accum micro-batches; DDP averages it
        over the processes on the last one. Returns the mean loss (0-d tensor, no host sync)."""
        t = self.cfg.train
        n = len(indices)
        gens = self.example_generators(n)
        x0, y, extra = self._batch(indices, generator=gens, flip=self.cfg.data.flip, device=self.device)
        step = {"step": self.step} if getattr(self.objective, "takes_step", False) else {}
        if t.channels_last and self.is_image:
            x0 = x0.contiguous(memory_format=torch.channels_last)  # (n, C, H, W)
        total = torch.zeros((), device=self.device)
        bounds = [n * i // t.grad_accum for i in range(t.grad_accum + 1)]
        for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            last = i == t.grad_accum - 1
            no_sync = self.ddp_net.no_sync() if self.dist.enabled and not last else contextlib.nullcontext()
            with no_sync:
                with self.autocast():
                    cond = {**self._cond(None if y is None else y[a:b]), **{k: v[a:b] for k, v in extra.items()}}
                    loss = self.objective(self.train_module, x0[a:b], cond, generator=gens[a:b], **step) * ((b - a) / n)
                loss.backward()
            total += loss.detach()
        return total

    def _gradients_or_eager(self, indices) -> torch.Tensor:
        """_gradients, falling back to the eager network once if the compiled one fails at its first call."""
        self.opt.zero_grad(set_to_none=True)
        try:
            loss = self._gradients(indices)
        except Exception as e:
            if not self._compile_pending:
                raise
            warnings.warn(f"train.compile: the compiled network failed ({type(e).__name__}: {e}); training eagerly")
            self._set_train_net(self.ddp_net)
            self.opt.zero_grad(set_to_none=True)
            loss = self._gradients(indices)
        self._compile_pending = False
        return loss

    def _gradient_norm(self) -> torch.Tensor:
        """The global gradient norm, the gradients clipped to train.grad_clip when it is set (Pascanu et al. 2013,
        "On the difficulty of training recurrent neural networks", Algorithm 1)."""
        if self.cfg.train.grad_clip > 0:
            return torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.cfg.train.grad_clip, foreach=True)
        return torch.nn.utils.get_total_norm([p.grad for p in self.net.parameters() if p.grad is not None],
                                             foreach=True)

    @property
    def schedule_fraction(self) -> float:
        """How far the learning-rate schedule has gone: train_seconds over the budget 60 * train.max_minutes
        (train.lr_schedule_over=time; 1 or more: spent), else the steps done over train.steps."""
        t = self.cfg.train
        return self.train_seconds / (60 * t.max_minutes) if t.lr_schedule_over == "time" else self.step / t.steps

    def scheduled_lr(self) -> float:
        """The learning rate of the next step, a function of recorded state only (the step, or train_seconds), so
        a continued run sets what an uninterrupted one would: lr_at(step), or lr_at_fraction(schedule_fraction)."""
        t = self.cfg.train
        return lr_at_fraction(self.schedule_fraction, t) if t.lr_schedule_over == "time" else lr_at(self.step, t)

    def train_step(self, indices) -> torch.Tensor:
        """One optimizer step on this process's `indices`: gradients (objective + backward, all-reduced), clipping,
        AdamW, EMA. A step whose gradient norm (or, in one process, loss) is not finite changes no weight (see
        _non_finite). Returns the loss as a 0-d tensor; the finite check is the step's one host sync."""
        for g in self.opt.param_groups:
            g["lr"] = self.scheduled_lr()
        loss = self._gradients_or_eager(indices)
        norm = self._gradient_norm()
        finite = torch.isfinite(norm) if self.dist.enabled else torch.isfinite(norm) & torch.isfinite(loss)
        self.skipped_last_step = not bool(finite)  # the gradient is all-reduced: every process agrees
        if self.skipped_last_step:
            self._non_finite(loss, norm)
        else:
            self.opt.step()
            self.ema.update(self.net)
            if hasattr(self.objective, "after_step"):  # e.g. consistency distillation's target network
                self.objective.after_step(self.module)
            self.nonfinite_in_a_row = 0
        self.step += 1
        self._commit()
        return loss

    def _divergence_advice(self) -> str:
        t = self.cfg.train
        disk = (f"{LAST} (step {self._last_on_disk}) holds the newest finite weights" if self._last_on_disk is not None
                else "the checkpoints on disk were left as they were")
        return (f"Nothing was saved: {disk}. Lower train.lr (now {t.lr:g}), set train.grad_clip (now {t.grad_clip:g}), "
                f"or let up to K such steps in a row be skipped with train.nonfinite_skips=K (now {t.nonfinite_skips})")

    def _non_finite(self, loss: torch.Tensor, norm: torch.Tensor) -> None:
        """A step with a NaN or infinite loss or gradient: skipped (batch consumed, no update of the weights, the
        optimizer or the EMA) up to train.nonfinite_skips times in a row, then NonFiniteLossError."""
        self.nonfinite_in_a_row += 1
        k = self.cfg.train.nonfinite_skips
        what = f"step {self.step + 1}: loss {float(loss):.4g}, gradient norm {float(norm):.4g}"
        if self.nonfinite_in_a_row > k:
            skipped = f", after {k} skipped steps in a row" if k else ""
            raise NonFiniteLossError(f"training diverged at {what} (not finite{skipped}). {self._divergence_advice()}")
        if self.dist.is_main:
            print(f"note: skipped {what} ({self.nonfinite_in_a_row} of at most {k} in a row)", file=sys.stderr)

    @torch.no_grad()
    def validation_loss(self) -> float:
        """The EMA weights' loss on the fixed validation batch (on a copy of the random stream: training's own
        stream is left where it was); a task with its own validation (text: bits per character) computes it."""
        if self.task.validation is not None:
            with torch.random.fork_rng(devices=[]):
                return float(self.val(self.ema_module))
        x0, y, sigma, noise, extra = self.val
        cond = {**self._cond(y), **{k: v.to(self.device) for k, v in extra.items()}}
        with torch.random.fork_rng(devices=[]):
            per = self.objective.per_sample(self.ema_module, x0.to(self.device), cond, sigma=sigma,
                                            noise=noise.to(self.device),
                                            generator=sample_generators(VAL_SEED, len(x0), offset=len(x0)))
        return float(per.mean())

    # ------------------------------------------------------------------------------------------- loop
    def fit(self) -> dict:
        """Train to train.steps (or train.max_minutes); returns a summary. A stop signal saves the run at a clean
        point and raises KeyboardInterrupt; the run lock is given back at the end, whatever happens."""
        t = self.cfg.train
        if self.dist.is_main and self.lock is None:  # a second fit() of this trainer
            self.lock = RunLock.acquire(self.run_dir)
        start_step, t0 = self.step, time.time()
        writer = bar = None
        try:
            writer = self._open_logs()
            if self.progress:
                bar = tqdm(total=t.steps, initial=self.step, desc=f"train {self.cfg.name}", unit="step",
                           dynamic_ncols=True)
            with StopSignals(quiet=not self.dist.is_main) as self._stop:
                stopped_early = self._guarded_loop(writer, bar, t0)
            elapsed = time.time() - t0
            if writer is not None:
                writer.close()
            if self.dist.is_main:
                for hook in self.hooks:
                    hook.end(self)
        finally:
            if bar is not None:
                bar.close()
            if writer is not None:
                writer.close()
            self.close()
        steps_done = self.step - start_step
        return {
            "steps": self.step, "steps_this_run": steps_done, "seconds": elapsed,
            "images_per_s": steps_done * t.batch_size / max(elapsed, 1e-9), "best_val": self.best_val,
            "stopped_early": stopped_early, "run_dir": str(self.run_dir), "train_seconds": self.train_seconds,
        }

    def _open_logs(self) -> ScalarWriter | None:
        """On rank 0: the run folder's config.yaml and the log writer; a continued run first drops the scalars
        logged after the checkpoint it continues from."""
        if not self.dist.is_main:
            return None
        self.run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(self.cfg, self.run_dir / "config.yaml")
        log_dir = self.run_dir / "logs"
        if self.resumed_from:
            rewrite_metrics(log_dir, [m for m in read_metrics(log_dir) if m["step"] <= self.step])
        return ScalarWriter(log_dir, purge_step=self.step + 1 if self.resumed_from else None)

    def _guarded_loop(self, writer, bar, t0) -> bool:
        """The loop, and what an interruption leaves: a stop signal (or a peer failing while one is pending)
        saves the run where it stands and raises KeyboardInterrupt; a data-parallel peer that died or froze
        saves it too and raises PeerFailure; a forced stop (a second signal) saves nothing."""
        try:
            stopped_early = self._loop(writer, bar, t0)
            if stopped_early:
                self.checkpoint(writer)
            return stopped_early
        except KeyboardInterrupt as e:
            saved = self._save_interrupted(writer) if isinstance(e, _StopRequested) else "stopped at once, not saved"
            self._say(f"\ninterrupted at step {self.step}: {saved}; run the same command again to continue")
            raise
        except Exception as e:
            if not (self.dist.enabled and is_peer_failure(e)):
                raise
            saved = self._save_interrupted(writer)
            if self._stop.requested:
                self._say(f"\ninterrupted at step {self.step}: {saved}; run the same command again to continue")
                raise _StopRequested(f"signal {self._stop.signum}") from e
            cause = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise PeerFailure(f"rank {self.dist.rank}: another process died or stopped answering within "
                              f"train.dist_timeout_s={self.cfg.train.dist_timeout_s:g} s at step {self.step} "
                              f"({cause}); {saved}. Run the same command again to continue; raise "
                              "train.dist_timeout_s if a process was only slow") from e

    def _say(self, line: str) -> None:
        if self.dist.is_main:
            print(line, file=sys.stderr, flush=True)

    def _save_interrupted(self, writer) -> str:
        """On rank 0: the run as it stands, the checkpoint that was due at this step included (so that `best`
        and the continuation are those of an uninterrupted run). Returns what happened, in words."""
        if not self.dist.is_main:
            return "rank 0 saves the run"
        last = self.ckpt_dir / LAST
        if self._last_on_disk == self.step and last.exists():
            return f"saved {last}"
        try:
            if self._checkpoint_due():
                self._checkpoint(writer)
            else:
                self._save("last")
        except (CheckpointError, NonFiniteLossError) as e:
            return f"could not save ({e})"
        return f"saved {last}"

    def _checkpoint_due(self) -> bool:
        t = self.cfg.train
        return bool(t.ckpt_every and self.step % t.ckpt_every == 0) or self._at_end()

    def _budget_spent(self) -> bool:
        """train.lr_schedule_over=time: the schedule has reached the end of the time budget (the run is done)."""
        return self.cfg.train.lr_schedule_over == "time" and self.schedule_fraction >= 1.0

    def _at_end(self) -> bool:
        return self.step == self.cfg.train.steps or self._budget_spent()

    def _loop(self, writer, bar, t0) -> bool:
        """Steps to train.steps or, with train.lr_schedule_over=time, to the end of the schedule's time budget
        (returns False), or to this invocation's time budget train.max_minutes (lr_schedule_over=steps; returns
        True): the log line, the hooks and the checkpoint when due, and a stop signal read at the top of each
        step and between hooks."""
        t = self.cfg.train
        over_time = t.lr_schedule_over == "time"
        deadline = t0 + 60 * t.max_minutes if t.max_minutes > 0 and not over_time else math.inf
        window = _LossWindow(self.device)
        self.net.train()
        while self.step < t.steps and not self._budget_spent():
            self._check_stop(every_process=True)
            window.add(self._timed_step(), counted=not self.skipped_last_step)
            if bar is not None:
                bar.update(1)
            if self.step % t.log_every == 0 or self._at_end():
                self._log(writer, bar, window, t0)
            self._run_hooks(writer)
            if self._checkpoint_due():
                self.checkpoint(writer)
            if self._out_of_time(deadline) and self.step < t.steps:
                return True
        if over_time and not self._budget_spent():
            self._say(f"note: train.steps={t.steps} reached at {self.schedule_fraction:.0%} of the time budget "
                      f"(train.max_minutes={t.max_minutes:g}): raise train.steps to train for the whole budget")
        return False

    def _timed_step(self) -> torch.Tensor:
        """train_step on the next batch, its clock time added to train_seconds: the elapsed training time counts
        the steps of fit's loop (batch, forward, backward, optimizer, EMA), not the log lines, hooks, validation
        and checkpoints between them nor start-up. With several processes, the time-based schedule takes their
        mean, so that all set the same learning rate and stop at the same step."""
        start = self.clock()
        loss = self.train_step(self.sampler.next_batch())
        seconds = self.clock() - start
        if self.dist.enabled and self.cfg.train.lr_schedule_over == "time":
            seconds = float(all_mean(torch.tensor(seconds, dtype=torch.float64, device=self.device), self.dist))
        self.train_seconds += seconds
        return loss

    def _check_stop(self, every_process: bool = False) -> None:
        """Raise _StopRequested if a stop signal came. With several processes the check is made at the top of
        each step by all of them together (a signal to any stops all at the same step); elsewhere (between
        hooks, on rank 0 alone) only a single process checks."""
        if self.dist.enabled:
            requested = every_process and any_flag(self._stop.requested, self.dist, self.device)
        else:
            requested = self._stop.requested
        if requested:
            raise _StopRequested(f"signal {self._stop.signum}")

    def _out_of_time(self, deadline: float) -> bool:
        """Past the time budget; with several processes rank 0 decides, at log steps, so all stop together."""
        if self.dist.enabled:
            return self.step % self.cfg.train.log_every == 0 and broadcast_flag(time.time() > deadline, self.dist,
                                                                                self.device)
        return time.time() > deadline

    def _log(self, writer, bar, window: _LossWindow, t0: float) -> None:
        """The mean loss of the window over all processes (the one host sync of a log step), lr and speed."""
        t = self.cfg.train
        now = time.time()
        total = float(all_mean(window.sum, self.dist))
        loss = total / window.n if window.n else math.nan
        ips = window.steps * t.batch_size / max(now - window.since, 1e-9)
        terms = {k: float(v.detach()) if torch.is_tensor(v) else float(v)
                 for k, v in getattr(self.objective, "last_terms", {}).items() if k != "loss"}
        lr = self.opt.param_groups[0]["lr"]
        over_time = t.lr_schedule_over == "time"  # then the schedule's progress too: the fraction of the budget
        if writer is not None:
            writer.add_scalars(self.step, {"loss": loss, "lr": lr, "images_per_s": ips, **terms,
                                           **({"schedule": self.schedule_fraction} if over_time else {})})
        if bar is not None:
            bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{ips:.0f}",
                            **({"lr": f"{lr:.3g}", "budget": f"{self.schedule_fraction:.0%}"} if over_time else {}))
        elif self.log_lines and self.dist.is_main and now - window.last_line >= LOG_LINE_EVERY_S:
            sched = (f"  lr {lr:.3g}  {self.train_seconds:.0f}/{60 * t.max_minutes:.0f} s of training "
                     f"({self.schedule_fraction:.0%})" if over_time else "")
            print(f"step {self.step}/{t.steps}  loss {loss:.4f}  {ips:.0f} img/s  {now - t0:.0f} s{sched}",
                  file=sys.stderr, flush=True)
            window.last_line = now
        window.reset(now)

    def _run_hooks(self, writer: ScalarWriter | None) -> None:
        """The hooks due at this step, on the main process with the network in eval mode and on a copy of the
        random stream (they never shift training); scalars they return are logged; a stop signal is read after
        each. The other processes wait at a barrier."""
        due = [h for h in self.hooks if h.every and self.step % h.every == 0]
        if not due:
            return
        self.net.eval()
        if self.dist.is_main:
            with torch.random.fork_rng(devices=[]):
                for hook in due:
                    scalars = hook(self)
                    if scalars and writer is not None:
                        writer.add_scalars(self.step, scalars)
                    self._check_stop()
        self.net.train()
        barrier(self.dist)

    def checkpoint(self, writer: ScalarWriter | None = None, sync: bool = True) -> None:
        """Validation loss with the EMA weights, then last (and best, if it improved) checkpoints; on rank 0
        only, the other processes wait at a barrier (sync=False: no barrier)."""
        if self.dist.is_main:
            self._checkpoint(writer)
        if sync:
            barrier(self.dist)

    def _checkpoint(self, writer: ScalarWriter | None = None) -> None:
        val = self.validation_loss()
        if writer is not None:
            writer.add_scalars(self.step, {"val_loss_ema": val})
        if val < self.best_val:
            self.best_val = val
            self._save("best")
        self._save("last")


def _adamw(params, **kwargs) -> torch.optim.AdamW:
    """AdamW (Loshchilov & Hutter 2019) with the fused kernel (CPU and CUDA in recent PyTorch), else foreach."""
    params = list(params)
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, foreach=True, **kwargs)


def train(cfg: RunConfig, **kwargs) -> dict:
    return Trainer(cfg, **kwargs).fit()
