"""``train``: one training run, from its settings to its files: the folder, the resumption, the data, then epoch
after epoch the step loop (``training.epoch``), TAGS-DC's epoch work, the bank diagnostics, the evaluation and the
epoch's checkpoint, and at the end the run's plots.

What a run guarantees (docs/TRAINING.md) is built from small modules this loop calls: ``preflight`` (settings
checked before any work), ``runs.folder`` (one run per folder, clean SIGINT / SIGTERM), ``runs.checkpoint``
(verified safetensors checkpoints with a previous one kept) and ``runs.fingerprint`` (the data's record, compared
on resume).

Under torchrun (``group``: the process group, fne_fast/sampling/distributed.py) each step's global batch of W·B
pairs is split over the ranks in rank order, the banks are sharded, the heads are wrapped in
DistributedDataParallel (fine-tuned runs sum the ranks' gradients in a fixed order instead: training.units) and the
loss is the global batch's (fne_fast/sampling/loss.py), so the run follows the data order, the negatives and the
losses of one process with batch W·B. TAGS-DC's pools are built by rank 0 and shared,
and every rank adds the same TAGS-DC loss (fne_fast/tags/trainer.py). Rank 0 holds the folder, evaluates and writes
every file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
import zlib

import torch

from fne_fast.data import FeatureSplit
from fne_fast.errors import UsageError
from fne_fast.io import write_jsonl
from fne_fast.runs.artifacts import METRICS_NAME, TIMING_NAME, keep_best, remove_unneeded_bank_files
from fne_fast.runs.checkpoint import save_checkpoint
from fne_fast.runs.folder import RunFolder, RunLockedError
from fne_fast.sampling import distributed
from fne_fast.tags.run import run_corpus, run_texts, write_examples, write_export
from fne_fast.training.config import TrainConfig
from fne_fast.training.data import check_features, load_splits
from fne_fast.training.diagnostics import epoch_diagnostics
from fne_fast.training.epoch import TIMING_SECTIONS, steps_per_epoch, train_one_epoch
from fne_fast.training.evaluate import embed_split, recalls_from_ranks, retrieval_metrics, retrieval_ranks
from fne_fast.training.model_selection import is_best_so_far
from fne_fast.training.plots import RUN_PLOTS, write_run_plots
from fne_fast.training.preflight import check_run_settings
from fne_fast.training.staleness import bank_staleness
from fne_fast.training.state import RunState, resume_state

__all__ = ["train"]


def _validation(run: RunState, split: FeatureSplit, swap_test) -> dict:
    """Strict rsum on the validation split (what selects the best epoch, fne_fast.training.model_selection) and
    the validation swap tests (where TAGS-DC's settings are chosen)."""
    image, text = embed_split(run.heads, split, run.device)
    metrics = {"val_rsum": retrieval_metrics(image, text, split.caption_image)["rsum"]}
    metrics.update(swap_test.metrics(run.heads, "val", image, text, split.caption_image)[0])
    return metrics


def _test_ranks(run: RunState, split: FeatureSplit, swap_test) -> tuple[dict[str, torch.Tensor], dict]:
    """The per-item test ranks with each swap test's per-triple outcomes, and the swap tests' metrics
    (``fne_fast.tags.run.SwapEvaluation``)."""
    image, text = embed_split(run.heads, split, run.device)
    metrics, outcomes = swap_test.metrics(run.heads, "test", image, text, split.caption_image)
    return {**retrieval_ranks(image, text, split.caption_image, split.image_group), **outcomes}, metrics


def train(config: TrainConfig, splits: dict[str, FeatureSplit] | None = None, group=None) -> list[dict]:
    """Trains (or resumes) a run in ``config.out``; returns the per-epoch metrics (also in metrics.jsonl).

    ``group``: the process group of a run over several processes (None: this process alone); every rank calls
    ``train`` with the same config, and rank 0 holds the folder and writes the files.

    Raises ``UsageError`` for settings or data the run cannot use (before any work where they can be known),
    ``RunLockedError`` when another run holds ``config.out``, ``CheckpointError`` when no checkpoint verifies,
    ``NonFiniteError`` when training diverges, ``RunInterrupted`` on SIGINT / SIGTERM."""
    check_run_settings(config, reads_data=splits is None)
    world_size, first = distributed.world_size(group), distributed.rank(group) == 0
    if config.bank_size % world_size:
        raise UsageError(f"--bank-size: must divide by the number of processes {world_size}, got {config.bank_size}")
    with _run_folder(config, group, world_size, first) as folder:
        resumed = resume_state(config, world_size, group)
        # Rank 0 alone may be busy for long (encoding features on a cold cache, evaluating, writing the
        # checkpoint): the other ranks wait for it in this group, whose timeout is long.
        patient = distributed.patient_group(group)
        if splits is None:
            with distributed.first_rank_first(patient):  # rank 0 fills the feature cache, the others read it
                splits = load_splits(config)
        check_features(splits)
        texts, swap_test = None, None  # rank 0 evaluates
        with distributed.first_rank_first(patient):  # rank 0 may parse and encode the swap test on a cold cache
            if first:
                texts, swap_test = run_texts(config, progress=not config.quiet)
            elif config.tags is not None:  # every rank trains TAGS-DC's heads, reading the parses rank 0 cached
                texts = run_corpus(config, progress=False)
        run = RunState(config, splits["train"], texts, group)
        run.inputs = {name: split.inputs for name, split in splits.items()}
        checkpoint_digest = ""
        if resumed is not None:
            resumed, checkpoint_digest = resumed
            run.load_state_dict(resumed)
            if run.first and not config.quiet:
                print(f"resuming {config.out} at epoch {run.next_epoch} (step {run.step})")
        _agree_on_start(run, group, checkpoint_digest)
        files = _RunFiles(config.out, folder, run)
        first_epoch = run.next_epoch
        for epoch in range(run.next_epoch, config.epochs):
            ranks = _train_and_evaluate(run, splits, swap_test, epoch, patient)
            run.next_epoch = epoch + 1
            state = run.state_dict()
            with distributed.first_rank_first(patient):  # the other ranks wait until the files are written
                if run.first:
                    files.write_epoch(state, ranks, epoch)
            if run.first and not config.quiet:
                print(_epoch_line(run.history[-1]), flush=True)
        # A finished run resumed with nothing left to train (an interrupted compare, restarted) keeps its plots.
        if (config.plots and run.history and run.first
                and (run.next_epoch > first_epoch or not _has_plots(config.out))):
            write_run_plots(config.out, run.heads, splits["test"], run.history, config.options, run.device)
    return run.history


def _train_and_evaluate(run: RunState, splits: dict[str, FeatureSplit], swap_test, epoch: int, patient):
    """One epoch's training, then its bank diagnostics (every rank, over its own rows) and evaluation (rank 0);
    appends the epoch's metrics row and timing to the run's. Returns the test ranks (on rank 0, else None)."""
    config = run.config
    started = time.perf_counter()
    timing = dict.fromkeys(TIMING_SECTIONS, 0.0)
    row = {"epoch": epoch, "sampler": config.sampler, "seed": config.seed}
    if run.tags and epoch == 0:  # a run resumes only after an epoch: epoch 0 is always a fresh start
        pretrain_metrics, pretrain_timing = run.tags.pretrain(run.heads, splits["train"], splits["val"])
        row.update(pretrain_metrics)
        timing.update(pretrain_timing)
    row.update(train_one_epoch(run, splits["train"], epoch, timing))
    if run.tags:
        tags_metrics, tags_timing = run.tags.finish_epoch(epoch, run.heads, splits["train"], splits["val"])
        row.update(tags_metrics)
        timing.update(tags_timing)
    # Every bank row's diagnostics: collective when sharded, each rank scoring its own rows.
    row["diagnostics"] = epoch_diagnostics(run.heads, splits["train"], run.image_bank, run.text_bank,
                                           run.criterion.stats.as_tensor(), run.criterion.options,
                                           sampler=config.sampler, device=run.device, oracle=config.oracle,
                                           thresholds=run.thresholds)
    if run.ledger:
        row["staleness"] = bank_staleness(run.heads, splits["train"], run.image_bank, run.text_bank, run.ledger,
                                          run.step, run.device)
    ranks = None
    if run.first:  # the heads are the same on every rank: one evaluation
        ranks, swap_metrics = _test_ranks(run, splits["test"], swap_test)
        row.update(recalls_from_ranks(ranks))
        row.update(swap_metrics)
        row.update(_validation(run, splits["val"], swap_test))
    row = distributed.broadcast_from_first(row, patient, "metrics")
    timing["epoch_seconds"] = time.perf_counter() - started
    timing["steps"] = steps_per_epoch(config, splits["train"].text_features.shape[0], run.world_size)
    run.history.append(row)
    run.timing.append({"epoch": epoch, **timing})
    return ranks


class _RunFiles:
    """Rank 0's files of a run: metrics.jsonl and timing.jsonl (rewritten whole, from the state), and each epoch's
    checkpoint, with the best-validation epoch's kept apart."""

    def __init__(self, out: str, folder: RunFolder | None, run: RunState):
        self.out, self.folder, self.run = out, folder, run
        self.metrics_path, self.timing_path = os.path.join(out, METRICS_NAME), os.path.join(out, TIMING_NAME)
        if run.first:
            folder.position = lambda: f"epoch {run.next_epoch} step {run.step}"
            self._write_logs()

    def _write_logs(self) -> None:
        write_jsonl(self.metrics_path, self.run.history)
        write_jsonl(self.timing_path, self.run.timing)

    def write_epoch(self, state: dict, ranks: dict[str, torch.Tensor], epoch: int) -> None:
        with self.folder.critical():  # a signal now takes effect once the epoch's files are all written
            if self.run.tags and self.run.config.tags_export:  # first: an epoch trained again rewrites its lines
                write_export(self.run.config.tags_export, epoch, self.run.tags.epoch_records)
            if is_best_so_far(self.run.history):
                keep_best(self.out, state, ranks, epoch)
            save_checkpoint(self.out, state)
            remove_unneeded_bank_files(self.out, state)
            self._write_logs()
            if self.run.tags:
                write_examples(self.out, self.run.tags)


@contextlib.contextmanager
def _run_folder(config: TrainConfig, group, world_size: int, first: bool):
    """The run's folder (``RunFolder``: its lock, clean SIGINT / SIGTERM), held by rank 0 for all ranks; the other
    ranks get None. Under several processes the ranks first agree that rank 0 took the folder and that they all
    run the same settings, so a refusal is the same error on every rank."""
    if world_size == 1:
        with RunFolder(config.out) as folder:
            yield folder
        return
    with contextlib.ExitStack() as stack:
        folder, problem = None, None
        if first:
            try:
                folder = stack.enter_context(RunFolder(config.out))
            except (RunLockedError, NotADirectoryError) as error:
                problem = str(error)
        settings = zlib.crc32(json.dumps(dataclasses.asdict(config), sort_keys=True, default=str).encode())
        table = distributed.agree("fne-fast train", [settings], problem, group, torch.device(config.device),
                                  error=UsageError)
        distributed.require_same("fne-fast train: the processes were started with different settings", table,
                                 ("settings fingerprint",), error=UsageError)
        yield folder


def _agree_on_start(run: RunState, group, checkpoint_digest: str = "") -> None:
    """Under several processes, before the first step: the ranks read the same data and start from the same
    point (the checkpoint file they resumed, epoch, step, the banks' ring, the parameters they loaded), or every
    rank stops with the same error naming what differs. DistributedDataParallel synchronised the parameters when
    it was built, before the resumption; a fine-tuned run's (no DDP) start equal from the seed and the pretrained
    layers, which this checks."""
    if run.world_size == 1:
        return
    parameters = 0
    tensors = list(run.heads.state_dict().values()) + (list(run.tags.heads.state_dict().values()) if run.tags else [])
    for tensor in tensors:
        parameters = zlib.crc32(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy(), parameters)
    data = zlib.crc32(json.dumps(run.inputs, sort_keys=True, default=str).encode())
    resumed = zlib.crc32(checkpoint_digest.encode())
    ring = [run.image_bank.pointer, run.image_bank.filled, run.text_bank.pointer, run.text_bank.filled]
    table = distributed.agree("fne-fast train", [resumed, run.next_epoch, run.step, *ring, parameters, data], None,
                              group, run.device, error=UsageError)
    distributed.require_same("fne-fast train: the processes start from different states", table,
                             ("checkpoint's CRC-32", "epoch", "step", "image ring pointer", "image ring filled",
                              "text ring pointer", "text ring filled", "parameters' CRC-32",
                              "data fingerprint's CRC-32"), error=UsageError)


def _has_plots(out: str) -> bool:
    return all(os.path.exists(os.path.join(out, name)) for name in RUN_PLOTS)


def _epoch_line(row: dict) -> str:
    fn_rate = "n/a" if row["fn_rate"] is None else f"{100 * row['fn_rate']:.1f}%"
    swap = "n/a" if row.get("swap_acc") is None else f"{row['swap_acc']:.1f}%"
    return (f"epoch {row['epoch']}{' (warm-up)' if row['warmup'] else ''}: loss {row['loss']:.4f}  "
            f"i2t R@1/5/10 {row['i2t_r1']:.1f}/{row['i2t_r5']:.1f}/{row['i2t_r10']:.1f}  "
            f"t2i R@1/5/10 {row['t2i_r1']:.1f}/{row['t2i_r5']:.1f}/{row['t2i_r10']:.1f}  rsum {row['rsum']:.1f}  "
            f"FN rate {fn_rate}  fallback {100 * row['fallback_rate']:.1f}%  swap {swap}")
