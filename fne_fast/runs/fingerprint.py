"""What a split was made from, by content: the feature cache's key and the checkpoint's record of the data.

A record describes each named group of source files (``{"font": [path], "stamps": [png, txt, ...]}``) by its
file count, total size and a SHA-256 over the files' names (relative to the group's common folder), sizes and
content hashes; with the encoders' versions (which carry the image size) and the hash of the split's items it
is the split's ``inputs`` record. Changing a byte of any source file changes the record, so the cache encodes
again and ``--resume`` refuses, listing the groups that changed (``differences``).

Hashing reads the source files, not the rendered images (emoji: the 11 MB font and two CLDR files; Tux Paint:
about 30 MB of stamps). Digests are remembered in ``file-digests.json`` in the cache folder, keyed by each file's
path, inode, size, modification and change times: a file is read again only when one of these changed (the
change time cannot be set back by a user, so rewriting a file in place with the same size and modification time
is still seen). A file changed within the last seconds is not remembered: a second write within the clock's
resolution could keep all four values.
"""

from __future__ import annotations

import hashlib
import json
import os
import time

from fne_fast.io import atomic_write_text

__all__ = ["file_digest", "describe_sources", "inputs_record", "record_digest", "differences", "MEMO_NAME"]

MEMO_NAME = "file-digests.json"
_CHUNK = 1 << 20
_SETTLED_NS = 2_000_000_000  # a file unchanged for this long has timestamps a rewrite would change


def file_digest(path: str) -> str:
    """SHA-256 of a file's content."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


class _DigestMemo:
    """File digests known from earlier runs, valid while the file's status is unchanged."""

    def __init__(self, folder: str | None):
        self.path = os.path.join(folder, MEMO_NAME) if folder else None
        self.entries: dict[str, list] = {}
        self.changed = False
        if self.path and os.path.isfile(self.path):
            try:
                with open(self.path, encoding="utf-8") as stream:
                    self.entries = json.load(stream)
            except (OSError, ValueError):
                self.entries = {}  # a damaged memo only costs hashing again

    def digest(self, path: str) -> tuple[int, str]:
        """(size, SHA-256) of the file."""
        absolute = os.path.abspath(path)
        status = os.stat(absolute)
        key = [status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns]
        known = self.entries.get(absolute)
        if isinstance(known, list) and len(known) == 2 and known[0] == key:
            return status.st_size, known[1]
        value = file_digest(absolute)
        if time.time_ns() - max(status.st_mtime_ns, status.st_ctime_ns) > _SETTLED_NS:
            self.entries[absolute] = [key, value]
            self.changed = True
        return status.st_size, value

    def save(self) -> None:
        if self.path and self.changed:
            # Files that are gone (a test's temporary folder, a moved data set) are forgotten.
            self.entries = {path: entry for path, entry in self.entries.items() if os.path.exists(path)}
            try:
                atomic_write_text(self.path, json.dumps(self.entries))
            except OSError:
                pass  # a read-only cache folder: digests are computed again next time
            self.changed = False


def describe_sources(sources: dict[str, list[str]], memo_folder: str | None = None) -> dict[str, dict]:
    """``{group: {"files", "bytes", "sha256", "folder"}}`` for each named group of source files."""
    memo = _DigestMemo(memo_folder)
    record = {}
    for group, paths in sources.items():
        paths = [os.path.abspath(path) for path in paths]
        folder = os.path.commonpath([os.path.dirname(path) for path in paths]) if paths else ""
        digest, total = hashlib.sha256(), 0
        for path in sorted(paths):
            size, content = memo.digest(path)
            total += size
            digest.update(f"{os.path.relpath(path, folder)}\0{size}\0{content}\n".encode("utf-8"))
        record[group] = {"files": len(paths), "bytes": total, "sha256": digest.hexdigest(), "folder": folder}
    memo.save()
    return record


def inputs_record(*, sources: dict[str, dict], encoders: str | None, items: str | None) -> dict:
    """A split's record: its described source files, the encoders' versions and the hash of its items."""
    return {"sources": sources, "encoders": encoders, "items": items}


def record_digest(record: dict) -> str:
    """A short hash of a record (the feature cache's key). Folders are left out: moving the data elsewhere
    keeps its features."""
    stripped = dict(record, sources={group: {key: value for key, value in entry.items() if key != "folder"}
                                     for group, entry in record.get("sources", {}).items()})
    return hashlib.sha256(json.dumps(stripped, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def _describe(entry: dict) -> str:
    return f"{entry['files']} file{'s' if entry['files'] != 1 else ''}, {entry['bytes']} bytes in {entry['folder']}"


def differences(stored: dict[str, dict | None], current: dict[str, dict | None]) -> list[str]:
    """What changed between two ``{split: record}`` maps, one line per changed item (empty when none did or
    when either side has no record, as for splits given in memory)."""
    lines = []
    for split in sorted(set(stored) | set(current)):
        before, after = stored.get(split), current.get(split)
        if before is None or after is None:
            continue
        if before.get("encoders") != after.get("encoders"):
            lines.append(f"{split} encoders: {before.get('encoders')} -> {after.get('encoders')}")
        if before.get("items") != after.get("items"):
            lines.append(f"{split} items (names and captions): changed")
        old, new = before.get("sources", {}), after.get("sources", {})
        for group in sorted(set(old) | set(new)):
            if group not in new:
                lines.append(f"{split} {group}: no longer read (was {_describe(old[group])})")
            elif group not in old:
                lines.append(f"{split} {group}: new ({_describe(new[group])})")
            elif old[group]["sha256"] != new[group]["sha256"]:
                lines.append(f"{split} {group}: content changed ({_describe(old[group])} -> {_describe(new[group])})")
    return lines
