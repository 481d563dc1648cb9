"""A sharded bank's rows in a run's checkpoint: one file per rank, so that no file, and no rank writing or
resuming, holds another rank's rows.

At each checkpoint every rank writes its rows of the sharded banks as one verified file (``runs.checkpoint``'s
format: safetensors, the SHA-256 inside) in ``<out>/checkpoint.shards/``, named by the step and the rank; rank 0
then publishes the checkpoint, which names each file with its digest and rows (``bank_reference``) instead of
holding the rows. Publication stays one atomic rename: until it, the checkpoint in place names the files of an
earlier step, which are still there; after it, the new one names files that were complete before it was written.
Files no kept checkpoint (latest, previous, best) names are removed after each save.

Resuming, each rank reads only the files that overlap its rows under the new number of processes (one at a
time), checks each against the digest the checkpoint recorded, and keeps its rows: a run saved by W processes
resumes with any other W'. A damaged, missing or foreign file makes the checkpoint unusable, like a damaged
checkpoint file: the ranks then agree to fall back to the previous one (``training.state.resume_state``).

The folder must be one file system for all ranks (one host, or a shared file system across hosts).
"""

from __future__ import annotations

import os

import torch

from fne_fast.runs.checkpoint import SUFFIX, CheckpointError, read_checkpoint, write_checkpoint_file

__all__ = ["SHARDS_DIRECTORY", "shard_file", "write_shard", "bank_reference", "is_sharded", "read_bank_rows",
           "remove_unreferenced"]

SHARDS_DIRECTORY = "checkpoint.shards"
_FORMAT_KEY = "shard"


def shard_file(step: int, rank: int, world_size: int) -> str:
    """The file of rank ``rank``'s rows at the checkpoint after ``step`` steps, relative to the run's folder."""
    return f"{SHARDS_DIRECTORY}/step{step:010d}-rank{rank}of{world_size}{SUFFIX}"


def write_shard(out: str, step: int, rank: int, world_size: int, banks: dict[str, dict]) -> str:
    """Writes this rank's rows of each bank (``{name: MemoryBank.shard_state()}``) atomically; returns the file's
    SHA-256."""
    return write_checkpoint_file(os.path.join(out, shard_file(step, rank, world_size)),
                                 {_FORMAT_KEY: {"step": step, "rank": rank, "world_size": world_size},
                                  "banks": banks})


def bank_reference(bank, step: int, digests: list[str]) -> dict:
    """What the checkpoint holds of a sharded bank: its ring counters and, per rank, its file, digest and rows."""
    rows = bank.size // len(digests)
    return {"size": bank.size, "pointer": bank.pointer, "filled": bank.filled,
            "shards": [{"file": shard_file(step, rank, len(digests)), "sha256": digest,
                        "rows": [rank * rows, (rank + 1) * rows]} for rank, digest in enumerate(digests)]}


def is_sharded(bank_state: dict) -> bool:
    """Whether a checkpoint's bank state names shard files (else it holds the whole bank)."""
    return "shards" in bank_state


def read_bank_rows(out: str, references: dict[str, dict], begin: int, end: int) -> dict[str, dict]:
    """Each bank's rows ``[begin, end)`` (``{name: reference}`` -> ``{name: state}``, as
    ``MemoryBank.load_state_dict`` takes it) from the shard files the references name: each file that overlaps
    the rows read once, one at a time, and verified against its recorded digest. Raises ``CheckpointError``."""
    parts: dict[str, list[dict[str, torch.Tensor]]] = {name: [] for name in references}
    files: dict[tuple[str, str], list[tuple[str, list[int]]]] = {}
    for name, reference in references.items():
        for shard in reference["shards"]:
            if shard["rows"][1] > begin and shard["rows"][0] < end:
                files.setdefault((shard["file"], shard["sha256"]), []).append((name, list(shard["rows"])))
    for (file, digest), wanted in files.items():
        path = os.path.join(out, file)
        banks = read_checkpoint(path, expected_sha256=digest).get("banks", {})
        for name, (first, last) in wanted:
            rows = banks.get(name)
            if rows is None or list(rows["rows"]) != [first, last]:
                raise CheckpointError(path, f"does not hold rows [{first}, {last}) of {name}")
            keep = slice(max(begin, first) - first, min(end, last) - first)
            # features, ids, and guides where the bank has them (language guidance)
            parts[name].append({key: rows[key][keep] for key in ("features", "ids", "guides") if key in rows})
        del banks
    states = {}
    for name, reference in references.items():
        if sum(part["ids"].shape[0] for part in parts[name]) != end - begin:
            raise CheckpointError(out, f"its shard files do not cover rows [{begin}, {end}) of {name}")
        states[name] = {key: torch.cat([part[key] for part in parts[name]]) for key in parts[name][0]}
        states[name].update(row_begin=begin, pointer=reference["pointer"], filled=reference["filled"])
    return states


def remove_unreferenced(out: str, states: list[dict]) -> None:
    """Removes the shard files none of ``states`` (the kept checkpoints' states) names."""
    directory = os.path.join(out, SHARDS_DIRECTORY)
    if not os.path.isdir(directory):
        return
    named = {os.path.normpath(shard["file"]) for state in states for bank in state.values()
             if isinstance(bank, dict) and is_sharded(bank) for shard in bank["shards"]}
    for entry in os.listdir(directory):
        relative = os.path.normpath(f"{SHARDS_DIRECTORY}/{entry}")
        if entry.endswith(SUFFIX) and relative not in named:
            os.remove(os.path.join(out, relative))
