"""The project cache directory, computed here so the server never imports the operator package."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$SLM_CACHE_DIR, else $XDG_CACHE_HOME/slm-monitoring, else ~/.cache/slm-monitoring."""
    explicit = os.environ.get("SLM_CACHE_DIR")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "slm-monitoring"
