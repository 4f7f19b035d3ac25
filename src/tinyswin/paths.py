"""Where tinyswin keeps what it builds once and reuses: decoded datasets and compiled kernels."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """Where tinyswin keeps caches: $TINYSWIN_CACHE, else $XDG_CACHE_HOME/tinyswin, else ~/.cache/tinyswin."""
    if os.environ.get("TINYSWIN_CACHE"):
        return Path(os.environ["TINYSWIN_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "tinyswin"
    return Path.home() / ".cache" / "tinyswin"
