"""Where collab_fast keeps what it builds or generates: extension builds, the toy data set, decode checks."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_root"]


def cache_root() -> Path:
    """$COLLAB_FAST_CACHE, else $XDG_CACHE_HOME/collab_fast, else ~/.cache/collab_fast."""
    if os.environ.get("COLLAB_FAST_CACHE"):
        return Path(os.environ["COLLAB_FAST_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "collab_fast"
