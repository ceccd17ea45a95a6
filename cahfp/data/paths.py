"""Where datasets live: ``--data-dir``, then ``$CAHFP_DATA_DIR``, then ``~/.cache/cahfp/data``."""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "CAHFP_DATA_DIR"


def default_data_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cahfp" / "data"


def resolve_data_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The data root: the explicit argument, else ``$CAHFP_DATA_DIR``, else the user cache."""
    if explicit:
        return Path(explicit).expanduser()
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    return default_data_dir()


def writable_dir(path: Path) -> bool:
    """True if ``path`` exists and is writable, or can be created."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            return False
        probe = probe.parent
    return probe.is_dir() and os.access(probe, os.W_OK | os.X_OK)
