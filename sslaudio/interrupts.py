"""Stopping a training run cleanly: SIGINT / SIGTERM end it after the step in progress.

`StopSignals` holds the handlers for the duration of `train.fit`; `Interrupted` is what fit raises
then (exit code 130); DataLoader workers ignore both signals (`worker_init`) and close the run
lock they inherited, so it never outlives the main process.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from contextlib import contextmanager

from sslaudio.runlock import close_inherited


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped fit() (exit code 130). `step`: the step the run folder holds from
    this process on the way out (None: no step had finished, nothing new was saved)."""

    def __init__(self, signum: int, step: int | None = None):
        self.signum, self.step = signum, step
        super().__init__(f"stopped by {self.signal_name}" + (f" after step {step}" if step is not None else ""))

    @property
    def signal_name(self) -> str:
        return _signal_name(self.signum)


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class StopSignals:
    """SIGINT / SIGTERM handlers for the duration of fit() (main thread only; the previous ones are
    restored after). Before the loop (`deferring` False) a signal raises Interrupted at once, as
    Ctrl-C always did. In the loop it only records the request (`signum`); the loop stops at the
    end of the step. A second signal more than GRACE_S later stops at once (without the unfinished
    step); one that arrives within GRACE_S is the same request delivered twice (the terminal and
    torchrun both send Ctrl-C on). Inside `protect()` (a commit, the config, a move) nothing is
    raised: the request waits until the files are complete."""

    GRACE_S = 1.0

    def __init__(self, announce: bool):
        self.announce, self.pid = announce, os.getpid()
        self.signum: int | None = None
        self.at = 0.0
        self.deferring = False
        self.protected = 0
        self.previous: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                try:
                    self.previous[s] = signal.signal(s, self._handle)
                except (ValueError, OSError):  # an embedding that does not allow it
                    pass
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self.previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        self.previous = {}

    def _handle(self, signum: int, frame) -> None:
        if os.getpid() != self.pid:  # a forked DataLoader worker before its init: the main process decides
            return
        first = self.signum is None
        if first:
            self.signum, self.at = signum, time.monotonic()
        if self.protected:
            return
        if not self.deferring:
            raise Interrupted(signum)
        if first:
            if self.announce:
                _write_stderr(f"\n{_signal_name(signum)}: finishing this step, then saving it "
                              f"(send it again to stop at once, without this step)\n")
        elif time.monotonic() - self.at > self.GRACE_S:
            raise Interrupted(signum)

    @contextmanager
    def protect(self):
        self.protected += 1
        try:
            yield
        finally:
            self.protected -= 1
        if not self.protected and not self.deferring and self.signum is not None:
            raise Interrupted(self.signum)


def _write_stderr(text: str) -> None:
    try:  # no locks: this runs in a signal handler
        os.write(2, text.encode())
    except OSError:
        pass


def worker_init(lock_handle: tuple[int, int, int] | None, worker_id: int) -> None:
    """A DataLoader worker: Ctrl-C / SIGTERM are the main process's to handle (it finishes the step,
    commits, and shuts the workers down), and the run lock must not outlive the main process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if lock_handle is not None:
        close_inherited(*lock_handle)
