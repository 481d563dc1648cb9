"""Atomic file writes: every file this package writes goes to a temporary file beside its destination and is
renamed over it, so a reader (or a run killed mid-write) sees the old file or the new one, never a torn one."""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager

__all__ = ["atomic_output", "atomic_save", "atomic_write_text", "write_jsonl", "read_jsonl"]


@contextmanager
def atomic_output(path: str, mode: str = "wb", suffix: str = ".tmp"):
    """Yields a stream to a temporary file in ``path``'s directory; on success it is flushed to disk and renamed
    over ``path``, on any exception (KeyboardInterrupt included) removed."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=suffix)
    try:
        with os.fdopen(handle, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as stream:
            yield stream
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def atomic_save(obj, path: str) -> None:
    """``torch.save`` of ``obj`` to ``path``, atomically."""
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
