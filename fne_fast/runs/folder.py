"""One run per folder, and clean interruption.

    with RunFolder(out) as folder:          # exclusive lock on out/.lock, or RunLockedError naming the holder
        folder.position = lambda: f"epoch {epoch} step {run.step}"
        ...                                 # SIGINT / SIGTERM raise RunInterrupted here
        with folder.critical():             # ... but wait until this block (a checkpoint write) has finished
            save_checkpoint(out, state)

The lock is an ``fcntl.flock`` on ``out/.lock``, held for the whole run: the kernel releases it when the process
ends, however it ends, so a SIGKILL leaves no stale lock (the file stays; only the lock on it counts). It holds
the owner's PID and host, for the refusal message. With the lock held, every temporary file in the folder is a
killed writer's, and entering removes them.
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import threading
from contextlib import contextmanager

from fne_fast.io import remove_stale_temporaries

__all__ = ["RunFolder", "RunLockedError", "RunInterrupted", "LOCK_NAME"]

LOCK_NAME = ".lock"
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class RunLockedError(Exception):
    """Another live process holds the folder's lock."""


class RunInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped the run; ``exit_code`` is 128 + the signal number (130, 143). A
    KeyboardInterrupt, so that ``except Exception`` blocks let it through."""

    def __init__(self, signal_number: int, position: str | None = None, advice: str = "continue with --resume"):
        where = f"at {position}" if position else "before the first epoch"
        super().__init__(f"interrupted ({signal.Signals(signal_number).name}) {where}; {advice}")
        self.signal_number, self.exit_code, self.position = signal_number, 128 + signal_number, position


class RunFolder:
    """The exclusive use of a run's output folder, and SIGINT / SIGTERM turned into ``RunInterrupted`` (in the
    main thread; elsewhere signals keep their handlers). ``position`` is a callable naming where the run is, for
    the interruption message. ``removed_temporaries`` lists the stale temporary files entering deleted."""

    def __init__(self, path: str, advice: str = "continue with --resume"):
        self.path, self.advice = path, advice  # the advice ends the interruption message
        self.position = lambda: None  # before the first epoch
        self.removed_temporaries: list[str] = []
        self._lock_file = None
        self._previous_handlers: dict = {}
        self._critical_depth = 0
        self._pending: int | None = None

    def __enter__(self) -> "RunFolder":
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise NotADirectoryError(f"--out {self.path} is a file, not a folder")
        os.makedirs(self.path, exist_ok=True)
        lock_path = os.path.join(self.path, LOCK_NAME)
        self._lock_file = open(lock_path, "a+", encoding="utf-8")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.seek(0)
            holder = self._lock_file.read().strip() or "a process that has not written its PID yet"
            self._lock_file.close()
            raise RunLockedError(f"--out {self.path} is in use by another run ({holder}); wait for it to finish, "
                                 "or choose another --out") from None
        self._lock_file.seek(0)
        self._lock_file.truncate()
        self._lock_file.write(f"PID {os.getpid()} on {socket.gethostname()}\n")
        self._lock_file.flush()
        self.removed_temporaries = remove_stale_temporaries(self.path, exclusive=True)
        if threading.current_thread() is threading.main_thread():
            for number in _SIGNALS:
                self._previous_handlers[number] = signal.signal(number, self._on_signal)
        return self

    def __exit__(self, *exc_info) -> None:
        for number, handler in self._previous_handlers.items():
            signal.signal(number, handler)
        self._previous_handlers.clear()
        if self._lock_file is not None:
            self._lock_file.close()  # closing the descriptor releases the lock
            self._lock_file = None

    def _on_signal(self, number: int, frame) -> None:
        if self._critical_depth and self._pending is None:
            self._pending = number  # finish the write first; critical() raises when it ends
            return
        if self._pending is not None and not self._critical_depth:
            return  # already stopping: a second signal during the clean-up changes nothing
        self._pending = number  # outside a write, or a second signal during one: stop now (a write is abandoned)
        raise RunInterrupted(number, self.position(), self.advice)

    @contextmanager
    def critical(self):
        """A block a first SIGINT / SIGTERM does not break: the signal takes effect when the block ends. A second
        one stops it at once (atomic writes then leave the old files in place)."""
        self._critical_depth += 1
        try:
            yield
        finally:
            self._critical_depth -= 1
        if not self._critical_depth and self._pending is not None:
            raise RunInterrupted(self._pending, self.position(), self.advice)
