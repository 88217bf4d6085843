"""Atomic file writes: write a hidden temp file beside the target, then rename it into place.

A reader sees either the old file or the complete new one, never a partial write; on any failure
(an exception, KeyboardInterrupt, a full disk) the temp file is removed and the target is left as
it was. I/O errors come out as OSError naming the target (not the temp file), so the CLI can print
`error: <path>: No space left on device`; safetensors' own I/O errors are turned into OSError too.
"""

from __future__ import annotations

import errno
import os
import re
import tempfile
from pathlib import Path
from typing import Callable

from safetensors import SafetensorError

_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how Rust's io::Error (safetensors) ends
TEMP_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")  # atomic_write's temp files: .<name>.XXXXXXXX.tmp


def atomic_write(path: str | Path, write: Callable[[str], None], *, mode: int | None = None,
                 fsync: bool = False) -> None:
    """Call write(tmp) on a fresh temp file in path's folder (created if needed), then replace path.

    The temp file is made by tempfile.mkstemp, so without `mode` the result is private (0600).
    `mode` (e.g. 0o666) gives it the permissions open() would give a new file: mode & ~umask.
    `fsync` flushes the file to the disk before the rename (checkpoints: the rename must not
    reach the disk before the data does).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_dir():  # os.replace would only fail after the whole write
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        if mode is not None:
            os.chmod(tmp, mode & ~_umask())
        write(tmp)
        if fsync:
            fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:  # already gone, or undeletable: the original error is the one to report
                pass
        named = as_os_error(e, path, tmp)
        if named is not None:
            raise named from e
        raise


def as_os_error(e: BaseException, path: str | Path, tmp: str | None = None) -> OSError | None:
    """An I/O error `e` met while writing `path` (through `tmp`) as an OSError naming `path`;
    None when `e` is not an I/O error or already names another file."""
    if isinstance(e, OSError):
        if e.errno is None or (e.filename is not None and e.filename != tmp):
            return None
        return OSError(e.errno, e.strerror or os.strerror(e.errno), str(path))  # the errno's subclass
    if isinstance(e, SafetensorError) and (m := _OS_ERROR.search(str(e))):
        code = int(m.group(1))
        return OSError(code, os.strerror(code), str(path))
    return None


def fsync_path(path: str | Path) -> None:
    """Flush a file's (or, on POSIX, a folder's) contents to the disk."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if Path(path).is_dir() else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        if Path(path).is_dir():  # folders cannot be opened on some systems (Windows)
            return
        raise
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EBADF) or not Path(path).is_dir():
            raise
    finally:
        os.close(fd)


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
