"""The files a training run writes into its folder, by name, and the two that other commands read back: the
best-validation epoch's checkpoint and its per-item test ranks (``fne-fast compare`` pairs runs by them)."""

from __future__ import annotations

import os

import torch

from fne_fast.errors import UsageError
from fne_fast.io import atomic_output
from fne_fast.runs.checkpoint import CheckpointError, checkpoint_path, read_checkpoint, save_checkpoint
from fne_fast.runs.shards import SHARDS_DIRECTORY, remove_unreferenced

__all__ = ["CHECKPOINT_NAME", "BEST_NAME", "BEST_RANKS_NAME", "METRICS_NAME", "TIMING_NAME", "keep_best",
           "remove_unneeded_bank_files", "read_best_test_ranks", "refuse_legacy_checkpoint"]

CHECKPOINT_NAME = os.path.basename(checkpoint_path("", "checkpoint"))
BEST_NAME = "best"  # the checkpoint of the best-validation epoch (fne_fast.training.model_selection)
BEST_RANKS_NAME = "best_test_ranks.safetensors"  # that epoch's per-item test ranks, for paired comparisons
METRICS_NAME = "metrics.jsonl"
TIMING_NAME = "timing.jsonl"
# The pickle checkpoint of earlier versions: never opened (unpickling can run code), only recognised.
_LEGACY_CHECKPOINT_NAME = "checkpoint.pt"
_RANKS_FORMAT = "fne_fast.test_ranks/1"


def keep_best(out: str, state: dict, ranks: dict[str, torch.Tensor], epoch: int) -> None:
    """Keeps the state of the best-validation epoch (checkpoint ``best``) and its test ranks. Called before the
    epoch's checkpoint is written, so a run killed in between redoes the epoch and writes both again."""
    from safetensors.torch import save

    metadata = {"epoch": str(epoch), "format": _RANKS_FORMAT}
    with atomic_output(os.path.join(out, BEST_RANKS_NAME)) as stream:
        stream.write(save({name: values.contiguous() for name, values in ranks.items()}, metadata=metadata))
    save_checkpoint(out, state, BEST_NAME, keep_previous=False)


def remove_unneeded_bank_files(out: str, latest: dict) -> None:
    """After a save under several processes: removes the banks' shard files (``fne_fast.runs.shards``) that
    neither the latest checkpoint (``latest``, its state), the previous one nor the best-validation one names."""
    if not os.path.isdir(os.path.join(out, SHARDS_DIRECTORY)):
        return
    kept = [latest]
    for path in (checkpoint_path(out, "checkpoint", previous=True), checkpoint_path(out, BEST_NAME)):
        try:
            kept.append(read_checkpoint(path))
        except CheckpointError:  # missing or unusable: the files it names are not needed
            pass
    remove_unreferenced(out, kept)


def read_best_test_ranks(out: str) -> tuple[int, dict[str, torch.Tensor]]:
    """(epoch, per-item test ranks) of a run's best-validation epoch."""
    from safetensors import safe_open

    path = os.path.join(out, BEST_RANKS_NAME)
    if not os.path.exists(path):
        raise UsageError(f"--out: {path} is missing: the run in {out} has no best-validation epoch recorded (was "
                         "it trained by an older fne_fast? train it again in a new folder)")
    with safe_open(path, framework="pt") as stored:
        return int(stored.metadata()["epoch"]), {name: stored.get_tensor(name) for name in stored.keys()}


def refuse_legacy_checkpoint(out: str) -> None:
    """Raises ``CheckpointError`` when ``out`` holds a pickle checkpoint of an older fne_fast."""
    legacy = os.path.join(out, _LEGACY_CHECKPOINT_NAME)
    if os.path.exists(legacy):
        raise CheckpointError(legacy, "written by an older fne_fast as a pickle, which is not opened because "
                                      "unpickling can run arbitrary code", "train again with another --out")
