"""Where data, feature networks and other downloads live: the user cache folder, never the repository."""
from __future__ import annotations

import os
from pathlib import Path

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
