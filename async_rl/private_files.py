"""Files only their owner may read: what holds a secret (an API key, a run's resolved config)."""

from __future__ import annotations

import os
from pathlib import Path


def write_private(path: Path, data: bytes) -> Path:
    """Write `data` to `path` (mode 0600, its new folders 0700), replacing any earlier content."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_CREAT
    with os.fdopen(fd, "wb") as file:
        file.write(data)
    return path
