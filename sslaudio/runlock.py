"""One writer per run folder: an exclusive `flock` on RUN/.lock, held for the whole of a pretrain.

    with RunLock(run_dir):      # raises RunLocked at once if another process holds it
        ...

The holder writes its pid (and host) into the file, so a refused process can name it. The lock is
the kernel's, not the file's: it goes away with the holder's last file descriptor, so a crashed or
SIGKILLed holder never leaves a stale lock behind (a leftover RUN/.lock file is harmless). On
release the file is removed; a process that opened it just before is sent round again (the
inode check below), so two processes can never both hold a lock on the same path.

A forked child (a DataLoader worker) inherits the descriptor and with it the lock; call
`close_inherited(*lock.handle())` in the child so that the lock dies with the holder alone.
Imports nothing of sslaudio.
"""

from __future__ import annotations

import errno
import os
import socket
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock; the lock file is written but nothing is locked
    fcntl = None

LOCK_NAME = ".lock"


class RunLocked(Exception):
    """Another process holds the run folder's lock (exit code 2)."""

    def __init__(self, run_dir: Path, pid: int | None, host: str | None):
        self.run_dir, self.pid, self.host = run_dir, pid, host
        who = f"pid {pid}" if pid is not None else "pid unknown"
        if host and host != socket.gethostname():
            who += f" on {host}"
        super().__init__(f"{run_dir} is in use by another sslaudio process ({who})")


class RunLock:
    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        """Take the lock (creating the run folder if needed), or raise RunLocked at once."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if fcntl is None:
                break
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    os.close(fd)
                    raise
                pid, host = _read_holder(fd)
                os.close(fd)
                raise RunLocked(self.run_dir, pid, host) from None
            if _same_file(fd, self.path):
                break
            os.close(fd)  # the previous holder removed the file between our open and flock: again
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n{socket.gethostname()}\n".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            if _same_file(fd, self.path):
                self.path.unlink()  # while still holding it: see the module docstring
        except OSError:
            pass
        os.close(fd)

    def handle(self) -> tuple[int, int, int] | None:
        """(fd, st_dev, st_ino) of the held lock, for close_inherited in a forked child."""
        if self.fd is None:
            return None
        st = os.fstat(self.fd)
        return self.fd, st.st_dev, st.st_ino

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def close_inherited(fd: int, dev: int, ino: int) -> None:
    """In a forked child: close the descriptor of the parent's lock (only if `fd` still is that
    file), so that the lock is released as soon as the parent exits or dies."""
    try:
        st = os.fstat(fd)
    except OSError:
        return
    if (st.st_dev, st.st_ino) == (dev, ino):
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _read_holder(fd: int) -> tuple[int | None, str | None]:
    """The pid and host the holder wrote (it may be writing them right now: retry briefly)."""
    for _ in range(20):
        text = os.pread(fd, 256, 0).decode(errors="replace").split("\n")
        if text and text[0].strip().isdigit():
            return int(text[0]), (text[1].strip() or None) if len(text) > 1 else None
        time.sleep(0.01)
    return None, None
