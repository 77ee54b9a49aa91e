"""Scalar logging: a JSON-lines file (``metrics.jsonl``, the record the trainer resumes from and the run report
reads) and a TensorBoard event file written by ``torch.utils.tensorboard.SummaryWriter`` (the ``tensorboard``
package, a dependency; ``tensorboard --logdir outputs`` shows the curves).
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

try:
    from torch.utils.tensorboard import SummaryWriter
except ImportError:  # tensorboard is a dependency, but an environment may lack it: the JSON lines still work
    SummaryWriter = None


class ScalarWriter:
    """Append scalars to ``metrics.jsonl`` and to the TensorBoard event file of `log_dir` (one tag per scalar).
    `purge_step` (a run continued from a checkpoint of that step): TensorBoard drops the events of the earlier
    process logged at that step or later, as the trainer drops those JSON lines."""

    def __init__(self, log_dir: str | Path, tensorboard: bool = True, purge_step: int | None = None):
        self.dir = Path(log_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(self.dir / "metrics.jsonl", "a")
        self.tb = None
        if tensorboard and SummaryWriter is None:
            print("[torchdiffusion] the tensorboard package is not installed: scalars go to metrics.jsonl only "
                  "(pip install tensorboard for the event file)", file=sys.stderr)
        elif tensorboard:
            self.tb = SummaryWriter(str(self.dir), purge_step=purge_step)

    def add_scalars(self, step: int, scalars: dict[str, float]) -> None:
        self.jsonl.write(json.dumps({"step": step, "time": time.time(), **scalars}) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for tag, value in scalars.items():
                self.tb.add_scalar(tag, float(value), global_step=step)
            self.tb.flush()

    def close(self) -> None:
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def read_metrics(log_dir: str | Path) -> list[dict]:
    """The records of ``metrics.jsonl`` (none if the folder or file is missing). A line that is not a JSON record
    with a step, such as the partial last line of a process killed while writing it, is skipped."""
    p = Path(log_dir) / "metrics.jsonl"
    if not p.exists():
        return []
    out = []
    for line in p.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            out.append(record)
    return out


def rewrite_metrics(log_dir: str | Path, records: list[dict]) -> None:
    """Replace ``metrics.jsonl`` by `records` atomically (a temporary file renamed over it), creating the folder."""
    d = Path(log_dir)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / "metrics.jsonl.tmp"
    tmp.write_text("".join(json.dumps(m) + "\n" for m in records))
    os.replace(tmp, d / "metrics.jsonl")
