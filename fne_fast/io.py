"""Atomic file writes: every file this package writes goes to a temporary file beside its destination and is
renamed over it, so a reader (or a run killed mid-write) sees the old file or the new one, never a torn one.

A temporary file is named ``.tmp-<host>-<pid>-<random><suffix>``: a process killed mid-write (SIGKILL, power loss)
leaves it behind, and ``remove_stale_temporaries`` deletes it at the next start: every one in a folder the caller
holds exclusively (a run's ``--out``), or only those of dead processes of this host in a shared folder (the
feature cache, where another live process may be writing).
"""

from __future__ import annotations

import json
import os
import re
import socket
import tempfile
from contextlib import contextmanager

__all__ = ["atomic_output", "atomic_save", "atomic_write_text", "write_jsonl", "read_jsonl",
           "remove_stale_temporaries", "temporary_prefix", "TEMPORARY_PREFIX"]

TEMPORARY_PREFIX = ".tmp-"
# Host names may hold characters a file name should not; the owner check only needs them to be distinct.
_HOST = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())[:64] or "host"
_OWNER = re.compile(re.escape(TEMPORARY_PREFIX) + r"(?P<host>[A-Za-z0-9._]+)-(?P<pid>\d+)-")


@contextmanager
def atomic_output(path: str, mode: str = "wb", suffix: str = ".tmp", before_replace=None):
    """Yields a stream to a temporary file in ``path``'s directory; on success it is flushed to disk and renamed
    over ``path`` (and the rename itself made durable), on any exception (KeyboardInterrupt included) removed.
    ``before_replace()``, when given, runs once the complete file is on disk, just before the rename (a
    checkpoint moves the file it replaces aside there)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=temporary_prefix(), suffix=suffix)
    try:
        with os.fdopen(handle, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as stream:
            yield stream
            stream.flush()
            os.fsync(stream.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
    sync_directory(directory)


def temporary_prefix(pid: int | None = None) -> str:
    """The name prefix of the temporary files process ``pid`` (default: this one) of this host writes."""
    return f"{TEMPORARY_PREFIX}{_HOST}-{os.getpid() if pid is None else pid}-"


def sync_directory(directory: str) -> None:
    """Makes renames in ``directory`` durable (a no-op where directories cannot be opened, as on Windows)."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass  # some file systems do not sync directories; the rename is still atomic
    finally:
        os.close(descriptor)


def atomic_save(obj, path: str) -> None:
    """``torch.save`` of ``obj`` to ``path``, atomically (the feature cache; run checkpoints use
    ``fne_fast.runs.checkpoint``, which never pickles)."""
    import torch

    with atomic_output(path, "wb", suffix=".pt") as stream:
        torch.save(obj, stream)


def atomic_write_text(path: str, text: str) -> None:
    with atomic_output(path, "w") as stream:
        stream.write(text)


def write_jsonl(path: str, rows: list[dict]) -> None:
    """Rewrites the whole file (one JSON object per line) atomically."""
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in rows))


def read_jsonl(path: str) -> list[dict]:
    """The rows of a JSON-lines file; an empty list when it does not exist."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as stream:
        return [json.loads(line) for line in stream if line.strip()]


def _owner_is_alive(name: str) -> bool:
    """Whether the process that created temporary file ``name`` may still be writing it."""
    owner = _OWNER.match(name)
    if owner is None or owner["host"] != _HOST:
        return True  # an unnamed owner or another host's process cannot be checked from here: leave it alone
    try:
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by another user
    return True


def remove_stale_temporaries(directory: str, *, exclusive: bool) -> list[str]:
    """Deletes the temporary files killed writers left in ``directory`` and returns their names. With
    ``exclusive`` (the caller holds the folder, e.g. a run's lock) every temporary file is stale; without it only
    those whose writer on this host is gone."""
    if not os.path.isdir(directory):
        return []
    removed = []
    for name in sorted(os.listdir(directory)):
        if not name.startswith(TEMPORARY_PREFIX):
            continue
        if not exclusive and _owner_is_alive(name):
            continue
        try:
            os.remove(os.path.join(directory, name))
        except FileNotFoundError:
            continue  # its writer finished or cleaned up meanwhile
        removed.append(name)
    return removed
