"""Checkpoints that can be trusted: no code runs on load, corruption is detected, a good one is always kept.

    save_checkpoint(out, {"heads": heads, "optimizer": optimizer, "step": 12, "history": rows})      # one call
    state = load_checkpoint(out)            # the latest that verifies (a warning when it is the previous one)
    state = read_checkpoint(path)           # one file, verified

A state is a tree of dicts, lists and tuples whose leaves are tensors, JSON values (str, int, float, bool, None)
or objects with a ``state_dict()`` method (modules, optimisers: stored as their state dict, so loading gives the
dict back for their ``load_state_dict``). Saving another named checkpoint (``name="best"``) or more state is the
same call with another name or more keys.

**Format.** One safetensors file, ``<name>.safetensors``: its tensors are the state's tensors, named by their
path in the state (``heads/image_head.layers.0.weight``), moved to the CPU; its metadata holds the rest of the
state as JSON (a ``{"$tensor": name}`` reference where a tensor was), a format tag and the SHA-256 of the whole
file computed with the digest's own 64 characters set to "0". The digest lives in the file it covers, so data and
digest are replaced together by one atomic rename (a digest in a second file could disagree with its data after
a kill between two renames). Loading parses the header and the JSON and reads the tensors with safetensors: no
pickle, so a planted file cannot run code, whatever it contains.

**Rotation.** A save writes a temporary file, moves the current ``<name>.safetensors`` (when it verifies) to
``<name>.previous.safetensors``, then renames the new file into place. At every moment one of the two is a
complete, verified checkpoint; ``load_checkpoint`` takes the latest that verifies and warns when that is the
previous one (the latest is missing after a kill between the two renames, or damaged).

**Test hook** (tests only): ``FNE_FAST_TEST_HOOK=<point>:<n>:<action>`` makes the n-th save of the run's
``checkpoint`` in this process (other names, such as ``best``, are not counted) do <action> — ``SIGKILL``,
``SIGINT``, ``SIGTERM`` (sent to itself) or ``sleep=<seconds>`` — at <point>:
``checkpoint-temp-written`` (the new file is complete in its temporary file), ``checkpoint-rotated`` (the old one
moved aside, the new one not yet in place) or ``checkpoint-saved``.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
import warnings
from collections import Counter

import torch

from fne_fast.io import atomic_output

__all__ = ["save_checkpoint", "load_checkpoint", "read_checkpoint", "open_checkpoint", "write_checkpoint_file",
           "stored_digest",
           "checkpoint_path", "has_checkpoint", "CheckpointError", "CheckpointWarning", "FORMAT", "SUFFIX"]

FORMAT = "fne_fast.checkpoint/1"
SUFFIX = ".safetensors"
_PREVIOUS = ".previous"
_DIGEST_KEY = "fne_fast.sha256"
_DIGEST_LENGTH = 64
_REFERENCE_KEYS = ("$tensor", "$tuple", "$items")
_ADVICE = "nothing was loaded; restore the file from a copy, or start the run afresh in another --out"


class CheckpointError(Exception):
    """A checkpoint cannot be used; the message names the file, the problem and what to do."""

    def __init__(self, path: str, problem: str, advice: str = _ADVICE):
        super().__init__(f"{path}: {problem}; {advice}")
        self.path, self.problem = path, problem


class CheckpointWarning(UserWarning):
    """The latest checkpoint failed verification (or is missing) and the previous one is used."""


def checkpoint_path(directory: str, name: str = "checkpoint", *, previous: bool = False) -> str:
    return os.path.join(directory, f"{name}{_PREVIOUS if previous else ''}{SUFFIX}")


def has_checkpoint(directory: str, name: str = "checkpoint") -> bool:
    """Whether ``directory`` holds a checkpoint of that name, latest or previous (usable or not)."""
    return any(os.path.exists(checkpoint_path(directory, name, previous=previous)) for previous in (False, True))


# ---- the state tree <-> JSON + named tensors -------------------------------------------------------------

def _encode(value, path: str, tensors: dict[str, torch.Tensor], shared: set):
    if isinstance(value, torch.Tensor):
        name = path or "tensor"
        while name in tensors:  # two paths that print alike ({0: …} and {"0": …}) still get distinct names
            name += "'"
        value = value.detach().cpu().contiguous()
        storage = value.untyped_storage().data_ptr()
        if storage in shared:  # safetensors refuses tensors that share storage: store a copy
            value = value.clone()
        shared.add(value.untyped_storage().data_ptr())
        tensors[name] = value
        return {"$tensor": name}
    if hasattr(value, "state_dict") and callable(value.state_dict):
        return _encode(value.state_dict(), path, tensors, shared)
    if isinstance(value, tuple):
        return {"$tuple": [_encode(item, f"{path}/{index}", tensors, shared) for index, item in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(item, f"{path}/{index}", tensors, shared) for index, item in enumerate(value)]
    if isinstance(value, dict):
        plain = all(isinstance(key, str) and key not in _REFERENCE_KEYS for key in value)
        encoded = {key: _encode(item, f"{path}/{key}".lstrip("/"), tensors, shared) for key, item in value.items()}
        if plain:
            return encoded
        return {"$items": [[_encode(key, f"{path}/key", tensors, shared), item] for key, item in encoded.items()]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store {type(value).__name__} at {path or 'the root'} in a checkpoint: use tensors, "
                    "dicts, lists, tuples, str, int, float, bool or None")


def _decode(value, tensors: dict[str, torch.Tensor]):
    if isinstance(value, list):
        return [_decode(item, tensors) for item in value]
    if not isinstance(value, dict):
        return value
    if value.keys() == {"$tensor"}:
        return tensors[value["$tensor"]]
    if value.keys() == {"$tuple"}:
        return tuple(_decode(item, tensors) for item in value["$tuple"])
    if value.keys() == {"$items"}:
        return {_decode(key, tensors): _decode(item, tensors) for key, item in value["$items"]}
    return {key: _decode(item, tensors) for key, item in value.items()}


# ---- one file ---------------------------------------------------------------------------------------------

def _digest_position(blob, header_end: int, digest: bytes) -> int:
    """Offset of the digest's 64 characters inside the header."""
    field = b'"' + _DIGEST_KEY.encode() + b'":"'
    start = bytes(blob[8:header_end]).find(field + digest)
    return -1 if start < 0 else 8 + start + len(field)


def _file_digest(blob, position: int) -> str:
    """SHA-256 of ``blob`` with the 64 digest characters at ``position`` read as "0"."""
    view = memoryview(blob)
    digest = hashlib.sha256(view[:position])
    digest.update(b"0" * _DIGEST_LENGTH)
    digest.update(view[position + _DIGEST_LENGTH:])
    return digest.hexdigest()


def _serialize(state: dict) -> list:
    """The checkpoint file's bytes, in pieces (no copy of the tensors' bytes is made to insert the digest)."""
    save = _safetensors().save
    if not isinstance(state, dict):
        raise TypeError(f"a checkpoint state must be a dict, got {type(state).__name__}")
    tensors: dict[str, torch.Tensor] = {}
    tree = json.dumps(_encode(state, "", tensors, set()))
    blob = save(tensors, metadata={"format": FORMAT, "state": tree, _DIGEST_KEY: "0" * _DIGEST_LENGTH})
    header_end = 8 + int.from_bytes(blob[:8], "little")
    position = _digest_position(blob, header_end, b"0" * _DIGEST_LENGTH)
    view = memoryview(blob)
    return [view[:position], _file_digest(blob, position).encode(), view[position + _DIGEST_LENGTH:]]


def _safetensors():
    try:
        import safetensors.torch
    except ImportError:
        raise ImportError("fne_fast checkpoints need the safetensors package: pip install safetensors (it is in "
                          "the `train` extra, which scripts/setup_data.sh installs)") from None
    return safetensors.torch


def stored_digest(path: str) -> str:
    """The SHA-256 a checkpoint file records in its header (read without the tensors; not verified here)."""
    with open(path, "rb") as stream:
        header = json.loads(stream.read(int.from_bytes(stream.read(8), "little")))
    return str((header.get("__metadata__") or {}).get(_DIGEST_KEY, ""))


def read_checkpoint(path: str, expected_sha256: str | None = None) -> dict:
    """The state saved in the checkpoint file ``path``, after verifying its SHA-256 (and that it is
    ``expected_sha256``, when given: the file another checkpoint names); tensors are on the CPU. Raises
    ``CheckpointError`` naming the file for a missing, truncated, damaged or foreign file."""
    load = _safetensors().load
    if not os.path.isfile(path):
        raise CheckpointError(path, "no such checkpoint file",
                              "a run writes checkpoint.safetensors into its --out; pass that file or the run folder")
    with open(path, "rb") as stream:
        blob = stream.read()
    header_end = 8 + int.from_bytes(blob[:8], "little") if len(blob) >= 8 else 0
    if header_end <= 8 or header_end > len(blob):
        if blob[:2] == b"PK" or blob[:1] == b"\x80":  # torch.save's zip archive, or a bare pickle
            raise CheckpointError(path, "a torch.save/pickle file, not an fne_fast checkpoint (safetensors); it is "
                                        "not opened, because unpickling can run arbitrary code",
                                  "retrain to get a checkpoint in the current format")
        truncated = len(blob) < 8 or blob[8:9] == b"{"
        raise CheckpointError(path, f"{'truncated' if truncated else 'not a safetensors file'} ({len(blob)} bytes)")
    try:
        header = json.loads(bytes(blob[8:header_end]))
        metadata = header.get("__metadata__") or {}
        expected_size = header_end + max((entry["data_offsets"][1] for key, entry in header.items()
                                          if key != "__metadata__"), default=0)
    except (UnicodeDecodeError, ValueError, AttributeError, KeyError, TypeError, IndexError) as error:
        raise CheckpointError(path, f"damaged header ({error!r})") from None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(path, f"not an fne_fast checkpoint (format {metadata.get('format')!r}, expected "
                                    f"{FORMAT!r})", "pass a checkpoint.safetensors written by fne-fast train")
    if len(blob) < expected_size:
        raise CheckpointError(path, f"truncated: {len(blob)} bytes of {expected_size}")
    digest = str(metadata.get(_DIGEST_KEY, ""))
    position = _digest_position(blob, header_end, digest.encode())
    if len(digest) != _DIGEST_LENGTH or position < 0 or _file_digest(blob, position) != digest:
        raise CheckpointError(path, "its content does not match its SHA-256: the file is damaged")
    if expected_sha256 is not None and digest != expected_sha256:
        raise CheckpointError(path, f"not the file the checkpoint names (SHA-256 {digest[:12]}…, expected "
                                    f"{expected_sha256[:12]}…): replaced by another run's or another save's file")
    try:
        return _decode(json.loads(metadata["state"]), load(blob))
    except (KeyError, ValueError, TypeError) as error:  # only a digest-consistent file from a buggy writer
        raise CheckpointError(path, f"inconsistent content ({error})") from None


# ---- a named checkpoint in a folder: rotation and fallback -------------------------------------------------

# Files this process wrote or verified, by (inode, size, mtime, ctime): a save moves such a file aside as the
# previous checkpoint without reading it again; any other is verified first, so a damaged latest never
# replaces a good previous.
_known_good: dict[str, tuple] = {}


def _signature(path: str) -> tuple:
    status = os.stat(path)
    return status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns


def _verifies(path: str) -> bool:
    if _known_good.get(path) == _signature(path):
        return True
    try:
        read_checkpoint(path)
    except CheckpointError:
        return False
    return True


_hook_counts: Counter = Counter()


def _test_hook(point: str, name: str) -> None:
    """The failure injection documented above; nothing happens unless FNE_FAST_TEST_HOOK names this point. It lives
    in the code it interrupts because the tests kill real runs in child processes, which no monkeypatch reaches."""
    setting = os.environ.get("FNE_FAST_TEST_HOOK", "")
    if name != "checkpoint" or not setting.startswith(point + ":"):
        return
    _hook_counts[point] += 1
    _, occurrence, action = setting.split(":", 2)
    if _hook_counts[point] != int(occurrence):
        return
    if action.startswith("sleep="):
        time.sleep(float(action[len("sleep="):]))
    else:
        os.kill(os.getpid(), getattr(signal, action))


def write_checkpoint_file(path: str, state: dict, before_replace=None) -> str:
    """Writes ``state`` as the checkpoint file ``path`` atomically (``before_replace()``, when given, runs once
    the complete file is on disk, just before it replaces ``path``); returns its SHA-256."""
    pieces = _serialize(state)
    with atomic_output(path, "wb", suffix=SUFFIX, before_replace=before_replace) as stream:
        for piece in pieces:
            stream.write(piece)
    _known_good[path] = _signature(path)
    return bytes(pieces[1]).decode()


def save_checkpoint(directory: str, state: dict, name: str = "checkpoint", *, keep_previous: bool = True) -> str:
    """Writes ``state`` as ``directory/<name>.safetensors`` atomically; with ``keep_previous`` the checkpoint it
    replaces (if it verifies) becomes ``<name>.previous.safetensors``. Returns the path written."""
    latest, previous = checkpoint_path(directory, name), checkpoint_path(directory, name, previous=True)

    def move_latest_aside():
        _test_hook("checkpoint-temp-written", name)
        if keep_previous and os.path.exists(latest) and _verifies(latest):
            os.replace(latest, previous)
            _known_good.pop(latest, None)
            _test_hook("checkpoint-rotated", name)

    write_checkpoint_file(latest, state, before_replace=move_latest_aside)
    _test_hook("checkpoint-saved", name)
    return latest


def load_checkpoint(directory: str, name: str = "checkpoint", accept=None) -> tuple[dict, str]:
    """``(state, path)`` of the latest checkpoint of that name that verifies: ``<name>.safetensors``, else
    ``<name>.previous.safetensors`` with a ``CheckpointWarning`` saying why. ``accept(state)``, when given, may
    refuse a verified state too (the files it names do not verify): it returns the problem, or None. Raises
    ``CheckpointError`` when neither exists or is accepted."""
    latest, previous = checkpoint_path(directory, name), checkpoint_path(directory, name, previous=True)
    problems = []
    for path in (latest, previous):
        if not os.path.exists(path):
            problems.append(f"{path} is missing")
            continue
        try:
            state = read_checkpoint(path)
        except CheckpointError as error:
            problems.append(f"{error.path}: {error.problem}")
            continue
        _known_good[path] = _signature(path)
        refused = accept(state) if accept is not None else None
        if refused is not None:
            problems.append(f"{path}: {refused}")
            continue
        if path == previous:
            warnings.warn(f"{problems[0]}; using the previous checkpoint {previous} instead", CheckpointWarning,
                          stacklevel=2)
        return state, path
    raise CheckpointError(directory, "no usable checkpoint: " + "; ".join(problems))


def open_checkpoint(path: str, name: str = "checkpoint") -> tuple[dict, str]:
    """``(state, file)`` of what a user points at: a run folder (its latest checkpoint of that name that
    verifies, as ``load_checkpoint``) or a checkpoint file (``read_checkpoint``)."""
    if os.path.isdir(path):
        return load_checkpoint(path, name)
    return read_checkpoint(path), path
