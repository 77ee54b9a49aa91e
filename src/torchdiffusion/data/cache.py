"""Where data, feature networks and other downloads live: the user cache folder, never the repository."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, IO

CACHE_ENV = "TORCHDIFFUSION_CACHE"


def cache_dir() -> Path:
    """$TORCHDIFFUSION_CACHE, else $XDG_CACHE_HOME/torchdiffusion, else ~/.cache/torchdiffusion."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "torchdiffusion"
    return Path.home() / ".cache" / "torchdiffusion"


def write_atomic(path: Path, write: Callable[[IO[bytes]], None], suffix: str = ".tmp") -> Path:
    """Write a file that is either absent or complete: `write(f)` fills a temporary file beside `path` (synced to
    disk), which then replaces `path` in one rename; on any failure the temporary file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
