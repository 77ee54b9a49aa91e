"""What keeps a run safe from its surroundings: the run lock, and stopping on a signal at a clean point.

**The run lock.** A run folder is written by one training process at a time: :class:`RunLock` holds an
exclusive ``flock`` on ``<run folder>/train.lock`` (which names the holder: pid, host, start time) for as long as
the run trains. A second process is refused with a message naming the holder; the kernel drops the lock when its
holder dies, so the lock file of a killed run is taken over with a notice. On file systems without locks the
file's pid is checked instead (same host only). Within one Python process the newest holder of a folder takes
the lock over from an earlier one (a Trainer built again in a notebook).

**Stopping on a signal.** :class:`StopSignals` turns SIGINT (Ctrl-C) and SIGTERM (``kill``, a scheduler's
preemption, torchrun's shutdown) into a request that the training loop reads between steps: the step in progress
finishes, and the loop saves the run exactly as it stands, so the continuation matches a run never stopped. A
second signal at least ``FORCE_AFTER_S`` seconds after the first raises KeyboardInterrupt at once, without saving
(launchers often forward one stop twice within milliseconds; those repeats are ignored).
"""
from __future__ import annotations

import datetime
import errno
import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # not on POSIX: the pid in the lock file is checked instead
    fcntl = None

LOCK_NAME = "train.lock"
FORCE_AFTER_S = 2.0  # a second signal this long after the first stops at once, without saving
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_HELD: dict[str, "RunLock"] = {}  # lock path -> the RunLock of this process that owns it


class RunLockError(RuntimeError):
    """The run folder is in use by another live training process."""


def describe_holder(info: dict | None) -> str:
    if not info:
        return "an unknown process (its lock file is empty)"
    return f"pid {info.get('pid')} on host {info.get('host')}, started {info.get('started')}"


def _read_info(fd: int) -> dict | None:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 1 << 16)
    try:
        info = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    return info if isinstance(info, dict) else None


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError, OverflowError):
        return True  # exists but not ours, or unreadable: assume it lives
    return True


def _refuse(folder: Path, info: dict | None) -> RunLockError:
    return RunLockError(f"the run folder {folder} is in use by another training run: {describe_holder(info)} (lock "
                        f"file {folder / LOCK_NAME}). Wait for it to finish or stop it, or choose another name=...")


def _flock(fd: int, path: Path, folder: Path) -> bool:
    """Take the exclusive lock on fd; False where the file system has no locks. Raises RunLockError if held."""
    if fcntl is None:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            info = _read_info(fd)
            os.close(fd)
            raise _refuse(folder, info) from None
        return False  # ENOLCK, EOPNOTSUPP, ...: no locks here
    return True


def _open_locked(path: Path, folder: Path) -> tuple[int, bool]:
    """(fd of the lock file, whether a kernel lock is held). Retries if a releasing holder unlinked the file
    between our open and our lock, so two processes never lock two different files of the same name."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        locked = _flock(fd, path, folder)
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd, locked
        os.close(fd)


class RunLock:
    """An exclusive lock on a run folder; see the module docstring. ``RunLock.acquire(folder)`` takes it (creating
    the folder), ``release()`` gives it back and deletes the lock file; ``stale`` names the holder of a lock file
    that was taken over from a process that had died (None if there was none)."""

    def __init__(self, path: Path, fd: int, stale: dict | None = None):
        self.path, self.fd, self.stale = path, fd, stale

    @classmethod
    def acquire(cls, folder: str | os.PathLike) -> "RunLock":
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / LOCK_NAME
        key = str(path.resolve())
        if key in _HELD:  # an earlier holder in this very process: take it over
            lock = _HELD[key] = cls(path, _HELD[key].fd)
            return lock
        fd, locked = _open_locked(path, folder)
        previous = _read_info(fd)
        if not locked and previous and previous.get("host") == socket.gethostname() \
                and previous.get("pid") != os.getpid() and _pid_alive(previous.get("pid")):
            os.close(fd)
            raise _refuse(folder, previous)
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": datetime.datetime.now().isoformat(timespec="seconds"), "argv": sys.argv[:8]}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(info).encode())
        lock = _HELD[key] = cls(path, fd, stale=previous)
        return lock

    def moved_to(self, folder: str | os.PathLike) -> None:
        """The locked folder was renamed to `folder` (the lock file went with it)."""
        key = next((k for k, v in _HELD.items() if v is self), None)
        if key is not None:
            del _HELD[key]
        self.path = Path(folder) / LOCK_NAME
        _HELD[str(self.path.resolve())] = self

    def release(self) -> None:
        """Delete the lock file and drop the lock (a no-op for a lock taken over or already released)."""
        key = next((k for k, v in _HELD.items() if v is self), None)
        if key is None:
            return
        del _HELD[key]
        try:
            if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)

    def __del__(self):
        try:
            self.release()
        except Exception:  # interpreter shutdown: the kernel drops the lock with the process anyway
            pass


class StopSignals:
    """SIGINT and SIGTERM as a stop request read between steps (see the module docstring). Use as a context
    manager around the training loop; outside the main thread it installs nothing (signals reach only the main
    thread). `quiet` silences the notice (the other ranks of a data-parallel run)."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.signum: int | None = None
        self.forced = False
        self._first_at = 0.0
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if self.signum is None:
            self.signum, self._first_at = signum, now
            if not self.quiet:  # os.write: a print could re-enter a print the signal interrupted
                os.write(2, (f"\n{signal.Signals(signum).name}: stopping after the current step and saving a "
                             f"checkpoint (signal again after {FORCE_AFTER_S:g} s to stop at once without "
                             "saving)\n").encode())
            return
        if now - self._first_at >= FORCE_AFTER_S:
            self.forced = True
            raise KeyboardInterrupt(f"{signal.Signals(signum).name} again: stopped at once, without saving")


__all__ = ["RunLock", "RunLockError", "StopSignals", "describe_holder", "LOCK_NAME", "FORCE_AFTER_S"]
