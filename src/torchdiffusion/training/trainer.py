"""The trainer: AdamW, warm-up + cosine learning rate, gradient clipping, EMA, mixed precision, checkpoints.

It holds no diffusion math: each step is ``loss = objective(module, x0, cond)`` with the module and objective
that :mod:`torchdiffusion.build` makes for the run's task. A run lives in ``out_dir/name``: ``config.yaml``,
``checkpoints/{last,best}.safetensors`` and ``logs/`` (JSON lines and a TensorBoard event file); pictures and
evaluations come from hooks (:class:`Hook`, e.g. :func:`torchdiffusion.app.hooks.standard_hooks`), so the trainer
imports neither. Starting a run whose folder holds a last checkpoint of the same configuration continues it
exactly: same data order, same random streams, same weights as a run that was never interrupted.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from tqdm.auto import tqdm

from ..build import build_module, build_objective, build_schedule, net_input_shape, num_classes, task_of
from ..checkpoint import CheckpointError, load_checkpoint, optimizer_from_flat, optimizer_to_flat, save_checkpoint
from ..config import RunConfig, dump_config, to_dict, upgrade_config
from ..data import EpochSampler, make_dataset
from ..utils import check_choice, hash_seed, sample_generators
from .distributed import all_mean, barrier, broadcast_flag, init_distributed, per_rank_batch, wrap_ddp
from .tracking import ScalarWriter, read_metrics

PRECISIONS = ("fp32", "bf16")
LR_SCHEDULES = ("cosine", "constant")
# fields that may change between a run and its continuation; every other field must match
RESUMABLE_CHANGES = {"name", "out_dir", "sample", "train.steps", "train.max_minutes", "train.log_every",
                     "train.sample_every", "train.ckpt_every", "train.threads", "train.grad_accum",
                     "train.compile", "train.eval_every", "train.eval_samples"}


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


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _interrupt_on_sigterm():
    """Treat SIGTERM (a `kill`, a scheduler's preemption) like Ctrl-C, so the loop saves a checkpoint first.
    Returns the previous handler, or None where handlers cannot be set (not the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _raise_interrupt)


def lr_at(step: int, cfg) -> float:
    """Linear warm-up to cfg.lr over warmup_steps, then cosine decay to min_lr_ratio * lr (or constant)."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
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


class Trainer:
    """Train the configured model on the configured data. `fit()` runs to cfg.train.steps (or max_minutes)."""

    def __init__(self, cfg: RunConfig, *, dataset=None, resume: bool = True, progress: bool | None = None,
                 log_lines: bool = False, device: str | torch.device | None = None, hooks=()):
        t = cfg.train
        self.task = task_of(cfg)
        self.hooks = list(hooks)
        check_choice("train.precision", t.precision, PRECISIONS)
        check_choice("train.lr_schedule", t.lr_schedule, LR_SCHEDULES)
        for name in ("steps", "batch_size"):
            if getattr(t, name) < 1:
                raise ValueError(f"train.{name} must be at least 1, got {getattr(t, name)}")
        self.cfg = cfg
        # data parallel under torchrun (a single process otherwise): rank 0 validates, samples, logs, saves
        self.dist = init_distributed()
        self.local_batch = per_rank_batch(t.batch_size, self.dist, t.grad_accum)
        self.device = torch.device(device) if device is not None else self.dist.device()
        self.run_dir = cfg.run_dir
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.progress = (sys.stderr.isatty() if progress is None else progress) and self.dist.is_main
        self.log_lines = log_lines  # without a progress bar, print a status line every 15 s
        if t.threads > 0:
            torch.set_num_threads(t.threads)

        self.data = dataset if dataset is not None else make_dataset(
            cfg.data.dataset, split="train", image_size=cfg.data.image_size, subset=cfg.data.subset)
        self._check_data_matches_model()
        self.val = self._validation_batch()

        torch.manual_seed(hash_seed(t.seed, 0))  # initialisation
        self.schedule = build_schedule(cfg)
        self.module = build_module(cfg, schedule=self.schedule).to(self.device)
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
        self.step = 0
        self.best_val = math.inf
        self.resumed_from = None
        if (self.ckpt_dir / "last.safetensors").exists():
            if resume:
                self._resume(self.ckpt_dir / "last.safetensors")
            elif self.dist.is_main:  # start over, but keep the earlier run: move it aside rather than overwrite it
                aside = self.run_dir.with_name(f"{self.run_dir.name}.{time.strftime('%Y%m%d-%H%M%S')}")
                self.run_dir.rename(aside)
                print(f"starting over: the earlier run in {self.run_dir} was moved to {aside}", file=sys.stderr)
        barrier(self.dist)

    # ------------------------------------------------------------------------------------------ setup
    @property
    def is_image(self) -> bool:
        return len(net_input_shape(self.cfg)) == 3

    @property
    def ema_denoiser(self):
        """The EMA weights wrapped like the trained module (a denoiser for task 'denoiser')."""
        return self.ema_module

    def _check_data_matches_model(self) -> None:
        want = net_input_shape(self.cfg)
        got = tuple(self.data.sample_shape)
        if want != got:
            hint = ("set model.unet.image_size / model.unet.in_channels, or data.image_size to resize"
                    if self.is_image else "set model.mlp.dim")
            raise ValueError(f"the data {self.cfg.data.dataset!r} has examples of shape {got} but the network "
                             f"expects {want}: {hint}")
        nc = num_classes(self.cfg)
        if nc is not None and getattr(self.data, "labels", None) is None:
            raise ValueError(f"the model is class-conditional ({nc} classes) but the data has no labels")

    def _validation_batch(self):
        """A fixed batch with fixed noise levels and noise: the loss on it picks the best checkpoint."""
        n = min(256, len(self.data))
        idx = torch.randperm(len(self.data), generator=torch.Generator().manual_seed(12345))[:n]
        x0, y = self.data.batch(idx)
        g = torch.Generator().manual_seed(54321)
        sigma = build_schedule(self.cfg).sample_sigmas(n, generator=g)
        noise = torch.randn(x0.shape, generator=g)
        return x0, y, sigma, noise

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

    # ------------------------------------------------------------------------------------ checkpoints
    def _save(self, name: str, extra: dict | None = None) -> Path:
        opt_tensors, opt_meta = optimizer_to_flat(self.opt)
        meta = {
            "config": to_dict(self.cfg),
            "step": self.step,
            "sampler": self.sampler.state_dict(),
            "optimizer": opt_meta,
            "best_val": None if math.isinf(self.best_val) else self.best_val,
            "ema_updates": self.ema.updates,
            "data_shape": list(self.data.sample_shape),
            "world_size": self.dist.world_size,
            **(extra or {}),
        }
        rng = {"torch": torch.get_rng_state()}  # dropout stream of rank 0; noise is seeded per step and example
        return save_checkpoint(self.ckpt_dir / f"{name}.safetensors", meta=meta, model=self.net.state_dict(),
                               ema=self.ema.model.state_dict(), optim=opt_tensors, rng=rng)

    def _resume(self, path: Path) -> None:
        meta, groups = load_checkpoint(path)
        diffs = config_differences(upgrade_config(meta["config"]), to_dict(self.cfg))
        if diffs:
            raise CheckpointError(
                f"{self.run_dir} holds a run with a different configuration ({'; '.join(diffs[:6])}). "
                "Choose another name=..., delete that folder, or pass --no-resume to start over in it.")
        self.net.load_state_dict(groups["model"])
        self.ema.model.load_state_dict(groups["ema"])
        self.ema.updates = meta["ema_updates"]
        self.opt.load_state_dict(optimizer_from_flat(groups["optim"], meta["optimizer"]))
        self.sampler.load_state_dict(meta["sampler"])  # global position: any world size continues it
        self.step = meta["step"]
        if self.dist.world_size == 1 and meta.get("world_size", 1) == 1:
            torch.set_rng_state(groups["rng"]["torch"])
        else:  # dropout masks cannot follow a change of sharding: reseed per process
            self._seed_dropout(self.step)
        self.best_val = math.inf if meta["best_val"] is None else meta["best_val"]
        self.resumed_from = str(path)

    # ----------------------------------------------------------------------------------------- pieces
    def autocast(self):
        if self.cfg.train.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

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
        x0, y = self.data.batch(indices, generator=gens, flip=self.cfg.data.flip, device=self.device)
        if t.channels_last and self.is_image:
            x0 = x0.contiguous(memory_format=torch.channels_last)  # (n, C, H, W)
        total = torch.zeros((), device=self.device)
        bounds = [n * i // t.grad_accum for i in range(t.grad_accum + 1)]
        for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            last = i == t.grad_accum - 1
            no_sync = self.ddp_net.no_sync() if self.dist.enabled and not last else contextlib.nullcontext()
            with no_sync:
                with self.autocast():
                    cond = self._cond(None if y is None else y[a:b])
                    loss = self.objective(self.train_module, x0[a:b], cond, generator=gens[a:b]) * ((b - a) / n)
                loss.backward()
            total += loss.detach()
        return total

    def train_step(self, indices) -> torch.Tensor:
        """One optimizer step on this process's `indices`: gradients (objective + backward, all-reduced), clipping,
        AdamW, EMA. Returns the loss as a 0-d tensor without synchronising with the device."""
        t = self.cfg.train
        for g in self.opt.param_groups:
            g["lr"] = lr_at(self.step, t)
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
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), t.grad_clip, foreach=True)
        self.opt.step()
        self.ema.update(self.net)
        self.step += 1
        return loss

    @torch.no_grad()
    def validation_loss(self) -> float:
        x0, y, sigma, noise = self.val
        per = self.objective.per_sample(self.ema_module, x0.to(self.device), self._cond(y), sigma=sigma,
                                        noise=noise.to(self.device))
        return float(per.mean())

    # ------------------------------------------------------------------------------------------- loop
    def fit(self) -> dict:
        t = self.cfg.train
        main = self.dist.is_main
        log_dir = self.run_dir / "logs"
        writer = None
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            dump_config(self.cfg, self.run_dir / "config.yaml")
            if self.resumed_from:  # drop scalars logged after the checkpoint we continue from
                kept = [m for m in read_metrics(log_dir) if m["step"] <= self.step]
                (log_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in kept))
            writer = ScalarWriter(log_dir)
        start_step, t0 = self.step, time.time()
        deadline = t0 + 60 * t.max_minutes if t.max_minutes > 0 else math.inf
        bar = None
        if self.progress:
            bar = tqdm(total=t.steps, initial=self.step, desc=f"train {self.cfg.name}", unit="step",
                       dynamic_ncols=True)
        loss_sum, loss_n, window_t, window_steps = torch.zeros((), device=self.device), 0, time.time(), 0
        stopped_early, last_line = False, 0.0
        previous_term = _interrupt_on_sigterm()
        try:
            self.net.train()
            while self.step < t.steps:
                loss_sum += self.train_step(self.sampler.next_batch())
                loss_n += 1
                window_steps += 1
                if bar is not None:
                    bar.update(1)
                if self.step % t.log_every == 0 or self.step == t.steps:
                    now = time.time()
                    loss = float(all_mean(loss_sum, self.dist)) / loss_n  # the one host sync, at log steps
                    ips = window_steps * t.batch_size / max(now - window_t, 1e-9)
                    if writer is not None:
                        writer.add_scalars(self.step, {"loss": loss, "lr": self.opt.param_groups[0]["lr"],
                                                       "images_per_s": ips})
                    if bar is not None:
                        bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{ips:.0f}")
                    elif self.log_lines and main and now - last_line >= 15:
                        print(f"step {self.step}/{t.steps}  loss {loss:.4f}  {ips:.0f} img/s  "
                              f"{now - t0:.0f} s", file=sys.stderr, flush=True)
                        last_line = now
                    loss_sum.zero_()
                    loss_n, window_t, window_steps = 0, now, 0
                self._run_hooks(writer)
                if (t.ckpt_every and self.step % t.ckpt_every == 0) or self.step == t.steps:
                    self.checkpoint(writer)
                if self.dist.enabled:  # all processes must stop at the same step: rank 0 decides at log steps
                    over = self.step % t.log_every == 0 and broadcast_flag(time.time() > deadline, self.dist,
                                                                           self.device)
                else:
                    over = time.time() > deadline
                if over and self.step < t.steps:
                    stopped_early = True
                    break
        except KeyboardInterrupt:
            self.checkpoint(writer, sync=False)
            print(f"\ninterrupted at step {self.step}: saved {self.ckpt_dir / 'last.safetensors'}; "
                  "run the same command again to continue", file=sys.stderr)
            raise
        finally:
            if bar is not None:
                bar.close()
            if previous_term is not None:
                signal.signal(signal.SIGTERM, previous_term)
        if stopped_early:
            self.checkpoint(writer)
        elapsed = time.time() - t0
        if writer is not None:
            writer.close()
        if main:
            for hook in self.hooks:
                hook.end(self)
        steps_done = self.step - start_step
        return {
            "steps": self.step, "steps_this_run": steps_done, "seconds": elapsed,
            "images_per_s": steps_done * t.batch_size / max(elapsed, 1e-9), "best_val": self.best_val,
            "stopped_early": stopped_early, "run_dir": str(self.run_dir),
        }

    def _run_hooks(self, writer: ScalarWriter | None) -> None:
        """The hooks due at this step, on the main process with the network in eval mode; scalars they return
        are logged. The other processes wait at a barrier."""
        due = [h for h in self.hooks if h.every and self.step % h.every == 0]
        if not due:
            return
        self.net.eval()
        if self.dist.is_main:
            for hook in due:
                scalars = hook(self)
                if scalars and writer is not None:
                    writer.add_scalars(self.step, scalars)
        self.net.train()
        barrier(self.dist)

    def checkpoint(self, writer: ScalarWriter | None = None, sync: bool = True) -> None:
        """Validation loss with the EMA weights, then last (and best, if it improved) checkpoints; on rank 0
        only, the other processes wait at a barrier (sync=False: no barrier, for an interrupted run)."""
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
