"""Atomic file writes: write a hidden temp file beside the target, then rename it into place.

A reader sees either the old file or the complete new one, never a partial write; on any failure
(an exception, KeyboardInterrupt) the temp file is removed and the target is left as it was.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


def atomic_write(path: str | Path, write: Callable[[str], None], *, mode: int | None = None) -> None:
    """Call write(tmp) on a fresh temp file in path's folder (created if needed), then replace path.

    The temp file is made by tempfile.mkstemp, so without `mode` the result is private (0600).
    `mode` (e.g. 0o666) gives it the permissions open() would give a new file: mode & ~umask.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        if mode is not None:
            os.chmod(tmp, mode & ~_umask())
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` atomically, with the permissions Path.write_text gives a new file."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text), mode=0o666)


def _umask() -> int:
    try:  # Linux: read it without changing it
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)  # elsewhere the only way to read it is to set it
    os.umask(old)
    return old
