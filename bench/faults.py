"""Fault benchmark: kill a training run at random moments (kill -9 and SIGTERM, during training steps and during
checkpoint writes), start it again each time, and compare its end with a run never interrupted.

    python bench/faults.py --n 20 --json outputs/bench_faults.json

Every run is a child process training the `toy2d` preset shortened to `--steps` steps (dropout on, so the
random stream must resume too; a checkpoint every `--ckpt-every` steps). A hook in the child appends each
completed step to a progress file, and its checkpoint writer pauses `--write-pause` seconds after writing the
temporary file (before the rename), so that "during a checkpoint write" is a moment one can hit. Fault i is
kill -9 or SIGTERM (alternating), at a random step up to two checkpoint intervals ahead or after a random delay
into the next checkpoint write (alternating in pairs). After each fault the run is started again; the table
reports per kind and moment: the faults, the restarts that continued from the newest checkpoint on disk, the
completed steps lost (completed before the fault, not in the checkpoint continued from), the bytes of temporary
files the fault left (each deleted at the next start), and at the end the bytes left in the run folder besides
the checkpoints and logs, and whether the final weights, EMA and optimizer state equal the uninterrupted run's
bit for bit. The goal: every restart continues, at most one checkpoint interval lost to kill -9 and none to
SIGTERM, nothing left over, identical final weights.
"""
from __future__ import annotations

import argparse
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
KINDS = ("kill -9", "SIGTERM")
MOMENTS = ("training step", "checkpoint write")
STARTUP_TIMEOUT_S = 300  # a child has this long to start training (importing torch on a busy machine)


def child_overrides(out: Path, steps: int, ckpt_every: int) -> list[str]:
    return [f"out_dir={out}", f"train.steps={steps}", f"train.ckpt_every={ckpt_every}", "train.log_every=1",
            "train.batch_size=64", "model.mlp.dropout=0.1", "train.warmup_steps=10", "train.threads=1"]


def child(out: Path, steps: int, ckpt_every: int, pause: float) -> int:
    """One training process: resume (or start) the run in `out`, report progress, pause inside checkpoint writes."""
    import torch

    from torchdiffusion import checkpoint
    from torchdiffusion.config import load_config
    from torchdiffusion.training import Hook, Trainer

    torch.set_num_threads(1)
    progress = open(out / "progress.txt", "a")
    write = checkpoint.save_file

    def paused_write(tensors, filename, metadata=None):
        write(tensors, filename, metadata=metadata)
        (out / "writing").touch()
        time.sleep(pause)  # the temporary file is complete, the rename not done
        (out / "writing").unlink()

    class Progress(Hook):
        every = 1

        def __call__(self, trainer):
            progress.write(f"{trainer.step}\n")
            progress.flush()

    checkpoint.save_file = paused_write
    tr = Trainer(load_config("toy2d", child_overrides(out, steps, ckpt_every)), progress=False, hooks=[Progress()])
    progress.write(f"start {tr.step}\n")
    progress.flush()
    try:
        tr.fit()
    except KeyboardInterrupt:
        return 130
    return 0


def read_progress(out: Path) -> list[tuple[int, list[int]]]:
    """Per process started so far: (the step it started from, the steps it completed); a partial last line is
    ignored."""
    runs = []
    p = out / "progress.txt"
    for line in (p.read_text().splitlines() if p.exists() else []):
        parts = line.split()
        if len(parts) == 2 and parts[0] == "start" and parts[1].isdigit():
            runs.append((int(parts[1]), []))
        elif len(parts) == 1 and parts[0].isdigit() and runs:
            runs[-1][1].append(int(parts[0]))
    return runs


def reached(out: Path) -> int:
    """The newest step the process started last has completed (its start if none)."""
    runs = read_progress(out)
    return max(runs[-1][1], default=runs[-1][0]) if runs else 0


def launch(out: Path, args, log) -> subprocess.Popen:
    cmd = [sys.executable, str(HERE), "--child", str(out), "--steps", str(args.steps), "--ckpt-every",
           str(args.ckpt_every), "--write-pause", str(args.write_pause)]
    return subprocess.Popen(cmd, stdout=log, stderr=log)


def wait_for(predicate, proc: subprocess.Popen, timeout: float) -> bool:
    """Poll `predicate` every 2 ms until it holds (True) or the process ended or timed out (False)."""
    end = time.time() + timeout
    while time.time() < end and proc.poll() is None:
        if predicate():
            return True
        time.sleep(0.002)
    return False


def run_dir(out: Path) -> Path:
    return out / "toy2d"


def on_disk_step(out: Path):
    from torchdiffusion.checkpoint import CheckpointError, read_meta

    try:
        return read_meta(run_dir(out) / "checkpoints" / "last.safetensors")["step"]
    except CheckpointError:
        return None


def temp_bytes(out: Path) -> int:
    return sum(p.stat().st_size for p in run_dir(out).rglob("*.tmp"))


def leftover_bytes(out: Path) -> int:
    """Bytes in the run folder that a finished run should not hold: temporary files and a lock file."""
    return temp_bytes(out) + sum(p.stat().st_size for p in run_dir(out).glob("train.lock"))


def one_fault(out: Path, i: int, args, rng: random.Random, log) -> dict:
    """Start the run, wait for the fault's moment, deliver it, wait for the process to end."""
    kind, moment = KINDS[i % 2], MOMENTS[(i // 2) % 2]
    before = len(read_progress(out))
    proc = launch(out, args, log)
    started = wait_for(lambda: len(read_progress(out)) > before, proc, STARTUP_TIMEOUT_S)
    start = read_progress(out)[-1][0] if started else None
    if start is not None and start < args.steps - 2:
        if moment == "training step":
            target = min(start + rng.randint(1, 2 * args.ckpt_every), args.steps - 2)
            hit = wait_for(lambda: reached(out) >= target, proc, 600)
            time.sleep(rng.uniform(0.0, 0.004))
        else:
            hit = wait_for(lambda: (out / "writing").exists() and reached(out) > start, proc, 600)
            time.sleep(rng.uniform(0.0, args.write_pause * 0.8))
        if hit and proc.poll() is None:
            proc.send_signal(signal.SIGKILL if kind == "kill -9" else signal.SIGTERM)
    code = proc.wait()
    (out / "writing").unlink(missing_ok=True)  # a marker of the benchmark, not of the run
    return {"kind": kind, "moment": moment, "start": start, "exit": code, "completed": reached(out),
            "on_disk": on_disk_step(out), "temp_bytes": temp_bytes(out)}


def final_equal(a: Path, b: Path) -> bool:
    import torch

    from torchdiffusion.checkpoint import load_checkpoint

    (ma, ga), (mb, gb) = (load_checkpoint(run_dir(x) / "checkpoints" / "last.safetensors") for x in (a, b))
    return ma["step"] == mb["step"] and all(
        ga[g].keys() == gb[g].keys() and all(torch.equal(ga[g][k], gb[g][k]) for k in ga[g])
        for g in ("model", "ema", "optim", "rng"))


def run(args) -> dict:
    root = Path(args.out)
    ref, faulty = root / "reference", root / "faulty"
    for d in (ref, faulty):
        d.mkdir(parents=True, exist_ok=False)
    rng = random.Random(args.seed)
    t0 = time.time()
    with open(root / "children.log", "w") as log:
        assert launch(ref, args, log).wait() == 0, "the uninterrupted run failed; see children.log"
        faults = [one_fault(faulty, i, args, rng, log) for i in range(args.n)]
        final = launch(faulty, args, log).wait()
    starts = [start for start, _ in read_progress(faulty)]
    for f, nxt in zip(faults, starts[1:]):  # the start after fault i is start i + 1
        f["resumed_from"] = nxt
        f["resumed"] = nxt == (f["on_disk"] or 0)
        f["lost"] = f["completed"] - nxt
    return {"faults": faults, "final_exit": final, "final_equal": final == 0 and final_equal(ref, faulty),
            "leftover_bytes": leftover_bytes(faulty), "seconds": time.time() - t0,
            "settings": {k: v for k, v in vars(args).items() if k not in ("child", "json")}}


def table(res: dict) -> str:
    rows = ["| kind | moment | faults | resumed | steps lost (max / mean) | temp bytes left by the fault |",
            "|---|---|---|---|---|---|"]
    for kind in KINDS:
        for moment in MOMENTS:
            fs = [f for f in res["faults"] if f["kind"] == kind and f["moment"] == moment]
            if fs:
                lost = [f["lost"] for f in fs]
                rows.append(f"| {kind} | {moment} | {len(fs)} | {sum(f['resumed'] for f in fs)} | "
                            f"{max(lost)} / {sum(lost) / len(lost):.1f} | {max(f['temp_bytes'] for f in fs)} |")
    rows.append(f"\nfinal run exit {res['final_exit']}; final weights, EMA and optimizer state equal the uninterrupted "
                f"run's: {res['final_equal']}; bytes left over in the run folder: {res['leftover_bytes']}; "
                f"{res['seconds']:.0f} s")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="kill -9 / SIGTERM a tiny training run at random moments, resume it, "
                                             "compare with an uninterrupted run")
    ap.add_argument("--n", type=int, default=20, help="faults (default: 20)")
    ap.add_argument("--steps", type=int, default=600, help="training steps of the run (default: 600)")
    ap.add_argument("--ckpt-every", type=int, default=25, help="steps between checkpoints (default: 25)")
    ap.add_argument("--write-pause", type=float, default=0.05,
                    help="seconds each checkpoint write pauses before its rename (default: 0.05)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the fault moments")
    ap.add_argument("--out", default=None, help="work folder (default: outputs/bench_faults-<time>)")
    ap.add_argument("--json", default=None, help="write the results as JSON here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(Path(args.child), args.steps, args.ckpt_every, args.write_pause)
    args.out = args.out or f"outputs/bench_faults-{time.strftime('%Y%m%d-%H%M%S')}"
    res = run(args)
    print(table(res))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
