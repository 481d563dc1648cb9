"""The training loop: cached backbone features -> projection heads -> FNELoss over momentum banks.

Every source of randomness is a function of the seed and a counter (head initialisation from the seed, the
epoch's shuffle from (seed, epoch), the op's Gumbel noise from (seed, global step)), and a checkpoint at the end
of each epoch holds everything else that evolves (heads, momentum heads, optimiser, banks, statistics, step
counter, metrics so far), so ``resume=True`` continues to exactly the numbers of an uninterrupted run.

What a run guarantees (docs/TRAINING.md) is built from small modules this loop calls: ``preflight`` (settings
checked before any work), ``rundir`` (one run per folder, clean SIGINT / SIGTERM), ``checkpoint`` (verified
safetensors checkpoints with a previous one kept) and ``fingerprint`` (the data's record, compared on resume).

Under torchrun (``group``: the process group, fne_fast/distributed.py) each step's global batch of W·B pairs
(``batch_size`` B per process) is split over the ranks in rank order, the banks are sharded, the heads are wrapped
in DistributedDataParallel and the loss is the global batch's (fne_fast/loss.py), so the run follows the data
order, the negatives and the losses of one process with batch W·B. Rank 0 holds the folder, evaluates and writes
every file; the checkpoint holds whole banks, so a run resumes with any number of processes of the same global
batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
import zlib
from dataclasses import dataclass, field

import torch

from fne_fast import distributed
from fne_fast.bank import MemoryBank
from fne_fast.checkpoint import CheckpointError, checkpoint_path, has_checkpoint, load_checkpoint, save_checkpoint
from fne_fast.data import DATASETS, SPLITS, FeatureSplit
from fne_fast.diagnostics import epoch_diagnostics
from fne_fast.evaluate import NonFiniteError, embed_split, recalls_from_ranks, retrieval_metrics, retrieval_ranks
from fne_fast.fingerprint import differences
from fne_fast.io import atomic_output, write_jsonl
from fne_fast.loss import DIAGNOSTIC_KEYS, SAMPLERS, FNELoss, sampler_mode
from fne_fast.models import MatchingHeads
from fne_fast.options import SamplerOptions
from fne_fast.preflight import UsageError, check_run_settings, check_splits, flag
from fne_fast.rundir import RunFolder, RunLockedError
from fne_fast.selection import is_best_so_far
from fne_fast.tags import TagsOptions

__all__ = ["TrainConfig", "train", "load_splits", "read_best_test_ranks", "CHECKPOINT_NAME", "BEST_NAME",
           "BEST_RANKS_NAME", "METRICS_NAME"]

CHECKPOINT_NAME = os.path.basename(checkpoint_path("", "checkpoint"))
BEST_NAME = "best"  # the checkpoint of the best-validation epoch (fne_fast.selection): best.safetensors
BEST_RANKS_NAME = "best_test_ranks.safetensors"  # that epoch's per-item test ranks, for paired comparisons
# The pickle checkpoint of earlier versions: never opened (unpickling can run code), only recognised.
_LEGACY_CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"
TIMING_NAME = "timing.jsonl"
_BANK_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Settings that may differ between a run and its resumption without changing its numbers.
_RESUMABLE_FIELDS = ("epochs", "resume", "out", "cache_dir", "plots", "quiet")
# Not compared directly on resume: the global batch, batch_size × processes, is.
_PER_PROCESS_FIELDS = ("batch_size",)


@dataclass
class TrainConfig:
    """Everything that defines a run. ``options`` are the sampler's (their ``mode`` follows ``sampler``); a dict
    is accepted for them, as a checkpoint stores it."""

    dataset: str = "emoji"
    sampler: str = "fne"
    options: SamplerOptions = field(default_factory=SamplerOptions)
    bank_size: int = 8224
    epochs: int = 5
    warmup_epochs: int = 1
    batch_size: int = 32
    lr: float = 5e-4
    device: str = "cpu"
    seed: int = 0
    out: str = "runs/emoji-fne"
    resume: bool = False
    stats_momentum: float | None = None
    momentum: float = 0.995
    joint_dim: int = 256
    hidden_dim: int = 1024
    bank_dtype: str = "float32"
    backend: str = "auto"
    image_size: int = 128
    limit: int | None = None
    eval_limit: int | None = None
    steps_per_epoch: int | None = None
    data_options: dict = field(default_factory=dict)
    tags: TagsOptions | None = None  # TAGS-DC beside the sampler (None: off); a dict is accepted, as stored
    cache_dir: str | None = None
    plots: bool = True
    quiet: bool = False

    def __post_init__(self):
        """Each value on its own (``UsageError`` naming the flag); ``preflight.check_run_settings`` checks what
        depends on the machine (device, backend, folders, data files) when the run starts."""
        if self.dataset not in DATASETS:
            raise UsageError(f"--dataset: must be one of {DATASETS}, got {self.dataset!r}")
        if self.sampler not in SAMPLERS:
            raise UsageError(f"--sampler: must be one of {SAMPLERS}, got {self.sampler!r}")
        if isinstance(self.options, dict):
            self.options = SamplerOptions(**self.options)
        self.options = self.options.replace(mode=sampler_mode(self.sampler))
        if isinstance(self.tags, dict):
            self.tags = TagsOptions(**self.tags)
        if self.bank_dtype not in _BANK_DTYPES:
            raise UsageError(f"--bank-dtype: must be one of {tuple(_BANK_DTYPES)}, got {self.bank_dtype!r}")
        for name in ("steps_per_epoch", "limit", "eval_limit"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UsageError(f"{flag(name)}: must be >= 1, got {getattr(self, name)}")
        for name in ("bank_size", "epochs", "batch_size", "joint_dim", "hidden_dim", "image_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"{flag(name)}: must be >= 1, got {getattr(self, name)}")
        if self.warmup_epochs < 0:
            raise UsageError(f"--warmup-epochs: must be >= 0, got {self.warmup_epochs}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise UsageError(f"--lr: must be finite and > 0, got {self.lr}")
        if not 0.0 <= self.momentum < 1.0:
            raise UsageError(f"--momentum: must be in [0, 1), got {self.momentum}")
        if self.stats_momentum is not None and not 0.0 <= self.stats_momentum < 1.0:
            raise UsageError(f"--stats-momentum: must be in [0, 1), got {self.stats_momentum}")


def load_splits(config: TrainConfig) -> dict[str, FeatureSplit]:
    """Features of every split, from the cache (encoding them on a miss)."""
    if config.dataset == "features":
        from fne_fast.data.features import default_cache_dir, load_feature_arrays

        directory = config.data_options.get("features_dir")
        if not directory:
            raise UsageError("--features-dir: --dataset features needs it")
        memo_folder = config.cache_dir or default_cache_dir()  # where the arrays' file digests are remembered
        splits = {split: load_feature_arrays(directory, split, memo_folder=memo_folder) for split in SPLITS}
    else:
        from fne_fast.data import load_raw_split
        from fne_fast.data.features import cached_feature_split
        from fne_fast.models import LazyEncoders

        encoders = LazyEncoders(config.image_size, config.device)
        splits = {split: cached_feature_split(load_raw_split(config.dataset, split, **config.data_options),
                                              encoders, cache_dir=config.cache_dir)
                  for split in SPLITS}
    # The limit subsets the full cached features, so limited runs share one cache with full runs.
    if config.limit is not None:
        splits = {name: split.first_images(config.limit) for name, split in splits.items()}
    # A large data set's evaluation (a ranking of every test item against all others) is capped apart from its
    # training set: what a large bank needs to fill up is not what a recall needs to be precise.
    if config.eval_limit is not None:
        splits.update({name: splits[name].first_images(config.eval_limit) for name in ("val", "test")})
    return splits


class _Run:
    """The evolving state of one training run, and its checkpoint."""

    def __init__(self, config: TrainConfig, train_split: FeatureSplit, texts=None, group=None):
        self.config, self.group = config, group
        self.world_size, self.rank = distributed.world_size(group), distributed.rank(group)
        device = torch.device(config.device)
        torch.manual_seed(config.seed)
        self.heads = MatchingHeads(train_split.image_features.shape[1], train_split.text_features.shape[1],
                                   config.joint_dim, config.hidden_dim, config.momentum).to(device)
        # DDP averages the ranks' gradients of the trainable heads (the momentum heads have none); the loss is
        # scaled so that the average is the global batch's gradient (fne_fast/loss.py).
        self.model = self.heads if group is None else torch.nn.parallel.DistributedDataParallel(
            self.heads, device_ids=[torch.cuda.current_device()] if device.type == "cuda" else None,
            process_group=group)
        self.optimizer = torch.optim.Adam(self.heads.trainable_parameters(), lr=config.lr)
        bank_dtype = _BANK_DTYPES[config.bank_dtype]
        self.image_bank = MemoryBank(config.bank_size, config.joint_dim, dtype=bank_dtype, device=device,
                                     group=group)
        self.text_bank = MemoryBank(config.bank_size, config.joint_dim, dtype=bank_dtype, device=device,
                                    group=group)
        self.criterion = FNELoss(config.sampler, config.options, seed=config.seed,
                                 stats_momentum=config.stats_momentum, backend=config.backend, device=device,
                                 group=group)
        self.tags = None
        if config.tags is not None:
            from fne_fast.tags.run import make_trainer

            self.tags = make_trainer(config.tags, texts, train_split, seed=config.seed, device=device,
                                     joint_dim=config.joint_dim, lr=config.lr, progress=not config.quiet)
        self.next_epoch = 0
        self.step = 0
        self.history: list[dict] = []
        self.timing: list[dict] = []  # kept in the checkpoint, so timing.jsonl is rewritten like metrics.jsonl
        self.inputs: dict[str, dict | None] = {}  # each split's record of its source files (fne_fast.fingerprint)

    def state_dict(self, banks: tuple | None = None) -> dict | None:
        """Collective when sharded (the banks' shards are gathered): the state on rank 0, None elsewhere.
        ``banks``: the (image, text) banks' states, where the caller has gathered them since the last step."""
        image_bank, text_bank = banks or (self.image_bank.state_dict(), self.text_bank.state_dict())
        if self.rank != 0:
            return None
        return {"config": dataclasses.asdict(self.config), "world_size": self.world_size,
                "next_epoch": self.next_epoch, "step": self.step,
                "heads": self.heads.state_dict(), "optimizer": self.optimizer.state_dict(),
                "image_bank": image_bank, "text_bank": text_bank,
                "stats": self.criterion.stats.state_dict(), "torch_rng": torch.get_rng_state(),
                "history": self.history, "timing": self.timing, "inputs": self.inputs,
                "tags": self.tags.state_dict() if self.tags else None}

    def load_state_dict(self, state: dict) -> None:
        """The state of a checkpoint whose settings ``_resume_state`` compared before the data was read; its
        record of the inputs is compared here, with the data's."""
        changed = differences(state["inputs"], self.inputs)
        if changed:
            raise UsageError("--resume: the data changed since the checkpoint was written: " + "; ".join(changed)
                             + ". Train on the new data in another --out")
        self.heads.load_state_dict(state["heads"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.image_bank.load_state_dict(state["image_bank"])
        self.text_bank.load_state_dict(state["text_bank"])
        self.criterion.stats.load_state_dict(state["stats"])
        torch.set_rng_state(state["torch_rng"])
        if self.tags:
            self.tags.load_state_dict(state["tags"])
        self.next_epoch, self.step, self.history = state["next_epoch"], state["step"], list(state["history"])
        self.timing = list(state["timing"])


def _check_same_settings(state: dict, config: TrainConfig, world_size: int) -> None:
    skipped = _RESUMABLE_FIELDS + _PER_PROCESS_FIELDS
    stored = {key: value for key, value in state["config"].items() if key not in skipped}
    current = {key: value for key, value in dataclasses.asdict(config).items() if key not in skipped}
    changed = [f"{key}={stored.get(key)!r} (now {current[key]!r})" for key in sorted(current)
               if stored.get(key) != current[key]]
    # Any number of processes may resume a run, as long as the global batch (hence the data order) is the same.
    stored_processes = state.get("world_size", 1)
    if state["config"]["batch_size"] * stored_processes != config.batch_size * world_size:
        changed.append(f"global batch = batch_size × processes = {state['config']['batch_size']} × "
                       f"{stored_processes} (now {config.batch_size} × {world_size})")
    if changed:
        raise UsageError("--resume: cannot resume: the checkpoint was trained with different settings: "
                         + ", ".join(changed))


def _clock(device: torch.device) -> float:
    """Wall time for the per-step breakdown; on a GPU it waits for queued kernels first, so each section is
    charged its own work (this synchronisation is the price of the breakdown)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _train_epoch(run: _Run, split: FeatureSplit, epoch: int, timing: dict[str, float]) -> dict:
    config, device = run.config, torch.device(run.config.device)
    warmup = epoch < config.warmup_epochs
    run.criterion.stats.reset()
    shuffle = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
    order = torch.randperm(split.text_features.shape[0], generator=shuffle)
    group_of_id = split.image_group.to(device) if split.image_group is not None else None
    sums = {key: torch.zeros((), dtype=torch.float64, device=device) for key in DIAGNOSTIC_KEYS}
    divergence = _DivergenceWatch(device, run.group)
    num_batches = _steps_per_epoch(config, order.numel(), run.world_size)
    from tqdm import tqdm

    # A step's global batch is the next W·B pairs of the shuffle; rank r takes its r-th slice of B (the last
    # batch of an epoch may leave a rank fewer pairs, or none).
    global_batch = config.batch_size * run.world_size
    mine = slice(run.rank * config.batch_size, (run.rank + 1) * config.batch_size)
    if run.tags:
        timing.update(run.tags.start_epoch(epoch, run.heads, split))
    bar = tqdm(order.split(global_batch)[:num_batches], total=num_batches, desc=f"epoch {epoch}", unit="step",
               disable=config.quiet or run.rank != 0, leave=False)
    for batch_number, global_captions in enumerate(bar):
        captions = global_captions[mine]
        ids = split.caption_image[captions].to(device)
        image_features = split.image_features[split.caption_image[captions]].to(device)
        text_features = split.text_features[captions].to(device)

        started = _clock(device)
        image, text, image_key, text_key = run.model(image_features, text_features)
        heads_forward = _clock(device)
        run.image_bank.enqueue(image_key, ids)
        run.text_bank.enqueue(text_key, ids)
        enqueued = _clock(device)
        batch = distributed.gather_batch(image, text, ids, run.group)
        run.criterion.stats.update(batch.similarity())
        stats_updated = _clock(device)
        loss, diagnostics = run.criterion(image, text, image_key, text_key, ids, image_bank=run.image_bank,
                                          text_bank=run.text_bank, step=run.step, warmup=warmup,
                                          group_of_id=group_of_id, update_stats=False, batch=batch)
        sampled = _clock(device)
        if run.tags:
            loss = loss + run.tags.step(batch_number, run.heads, split)
        tags_loss = _clock(device)
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.optimizer.step()
        if run.tags:
            run.tags.optimizer_step()
        run.heads.update_momentum()
        divergence.record(run.step, loss)
        finished = _clock(device)

        timing["heads"] += (heads_forward - started) + (finished - tags_loss)
        if run.tags:
            timing["tags_loss"] = timing.get("tags_loss", 0.0) + tags_loss - sampled
        timing["bank_update"] += enqueued - heads_forward
        timing["statistics"] += stats_updated - enqueued
        timing["sampling_and_loss"] += sampled - stats_updated
        run.step += 1
        for key in DIAGNOSTIC_KEYS:
            sums[key] += diagnostics[key]
        if device.type == "cpu" or batch_number % 20 == 19 or batch_number == num_batches - 1:
            divergence.raise_if_diverged(epoch)
        if not bar.disable and batch_number % 20 == 0:
            bar.set_postfix(loss=f"{diagnostics['loss'].item() * run.world_size:.4f}")  # rank 0's share × W
    bar.close()
    divergence.raise_if_parameters_diverged(epoch, run.step - 1, run.heads)

    # One all_reduce adds up the ranks' sums (their shares of the loss, their anchors' diagnostics).
    summed = distributed.all_reduce(torch.stack([sums[key] for key in DIAGNOSTIC_KEYS]), run.group, "metrics")
    totals = dict(zip(DIAGNOSTIC_KEYS, summed.tolist()))
    stats = run.criterion.stats.as_tensor().tolist()
    return {"loss": totals["loss"] / num_batches,
            "fn_rate": (totals["false_negatives"] / totals["group_slots"]
                        if split.image_group is not None and totals["group_slots"] else None),
            # The FN rate of the negatives the sampler drew itself, leaving out the hardest-negative fallbacks.
            "fn_rate_sampled": (totals["sampled_false_negatives"] / totals["sampled_group_slots"]
                                if split.image_group is not None and totals["sampled_group_slots"] else None),
            "fallback_rate": totals["fallback"] / totals["slots"] if totals["slots"] else 0.0,
            "mean_p_fn": totals["p_fn_sum"] / totals["p_fn_slots"] if totals["p_fn_slots"] else None,
            "warmup": warmup,
            "stats": dict(zip(("mu_pos", "var_pos", "mu_neg", "var_neg", "n_pos"), stats))}


class _DivergenceWatch:
    """The first step whose loss holds NaN or infinity, recorded on the device each step and read (a host
    synchronisation) every step on a CPU, where it costs nothing, and every 20 steps on a GPU, so the error still
    names the exact step. Parameters that turn non-finite make the next step's loss non-finite; those of the
    epoch's last step are checked once at its end."""

    # "No bad step yet": larger than any step, so that the earliest bad step over the ranks is their minimum.
    _NONE = 2**62

    def __init__(self, device: torch.device, group=None):
        self.group = group
        self.first_bad_step = torch.full((), self._NONE, dtype=torch.int64, device=device)

    @torch.no_grad()
    def record(self, step: int, loss: torch.Tensor) -> None:
        bad = (self.first_bad_step == self._NONE) & ~loss.detach().isfinite()
        self.first_bad_step = torch.where(bad, step, self.first_bad_step)

    def raise_if_diverged(self, epoch: int) -> None:
        # Every rank reads the earliest bad step of any rank, so all of them raise the same error together.
        step = int(distributed.all_reduce(self.first_bad_step.clone(), self.group, "divergence", "min"))
        if step != self._NONE:
            raise NonFiniteError(f"training diverged at epoch {epoch} step {step}: the loss is not finite "
                                 f"(NaN or infinity); {_DIVERGED}")

    @torch.no_grad()
    def raise_if_parameters_diverged(self, epoch: int, step: int, heads: torch.nn.Module) -> None:
        # NaN and infinity survive a sum, so one sum per tensor tells whether it holds any.
        if not torch.stack([parameter.sum() for parameter in heads.parameters()]).isfinite().all():
            raise NonFiniteError(f"training diverged at epoch {epoch} step {step}: the parameters after the "
                                 f"optimiser step are not finite (NaN or infinity); {_DIVERGED}")


_DIVERGED = "nothing of this epoch was saved, the folder keeps the last good checkpoint. Try a lower --lr"


def _steps_per_epoch(config: TrainConfig, num_pairs: int, world_size: int) -> int:
    """Global batches in an epoch: all of them, or the first ``steps_per_epoch`` of the epoch's shuffle (short
    runs and timing runs over a large data set)."""
    num_batches = math.ceil(num_pairs / (config.batch_size * world_size))
    return num_batches if config.steps_per_epoch is None else min(num_batches, config.steps_per_epoch)


def _validation_rsum(run: _Run, split: FeatureSplit) -> float:
    """Strict rsum on the validation split: what selects the best epoch (fne_fast.selection)."""
    image, text = embed_split(run.heads, split, torch.device(run.config.device))
    return retrieval_metrics(image, text, split.caption_image)["rsum"]


def _test_ranks(run: _Run, split: FeatureSplit, swap_test) -> tuple[dict[str, torch.Tensor], dict]:
    """The per-item test ranks, and the one-word-swap test's metrics (``fne_fast.tags.run.SwapEvaluation``)."""
    image, text = embed_split(run.heads, split, torch.device(run.config.device))
    return (retrieval_ranks(image, text, split.caption_image, split.image_group),
            swap_test.metrics(run.heads, image, text, split.caption_image))


def _keep_best(out: str, state: dict, ranks: dict[str, torch.Tensor], epoch: int) -> None:
    """Keeps the state of the best-validation epoch (checkpoint ``best``) and its test ranks. Called before the
    epoch's checkpoint is written, so a run killed in between redoes the epoch and writes both again."""
    from safetensors.torch import save

    metadata = {"epoch": str(epoch), "format": "fne_fast.test_ranks/1"}
    with atomic_output(os.path.join(out, BEST_RANKS_NAME)) as stream:
        stream.write(save({name: values.contiguous() for name, values in ranks.items()}, metadata=metadata))
    save_checkpoint(out, state, BEST_NAME, keep_previous=False)


def read_best_test_ranks(out: str) -> tuple[int, dict[str, torch.Tensor]]:
    """(epoch, per-item test ranks) of a run's best-validation epoch."""
    from safetensors import safe_open

    path = os.path.join(out, BEST_RANKS_NAME)
    if not os.path.exists(path):
        raise UsageError(f"--out: {path} is missing: the run in {out} has no best-validation epoch recorded (was "
                         "it trained by an older fne_fast? train it again in a new folder)")
    with safe_open(path, framework="pt") as stored:
        return int(stored.metadata()["epoch"]), {name: stored.get_tensor(name) for name in stored.keys()}


def _resume_state(config: TrainConfig, world_size: int) -> dict | None:
    """The checkpoint state to continue from (verified, settings compared), or None for a new run; refuses to
    overwrite a run without ``resume``. Reads no data, so a wrong setting stops the run before any work."""
    legacy = os.path.join(config.out, _LEGACY_CHECKPOINT_NAME)
    if os.path.exists(legacy):
        raise CheckpointError(legacy, "written by an older fne_fast as a pickle, which is not opened because "
                                      "unpickling can run arbitrary code", "train again with another --out")
    if not has_checkpoint(config.out):
        return None
    if not config.resume:
        raise UsageError(f"--out: {config.out} already holds a run ({CHECKPOINT_NAME}); pass --resume to continue "
                         "it, or choose another --out")
    state, _ = load_checkpoint(config.out)
    _check_same_settings(state, config, world_size)
    return state


def _check_features(splits: dict[str, FeatureSplit]) -> None:
    """Splits given in memory are checked like loaded ones: not empty, finite."""
    check_splits(splits)
    for name, split in splits.items():
        bad = split.first_nonfinite()
        if bad is not None:
            raise UsageError(f"--dataset: row {bad[1]} of the {name} split's {bad[0]} is not finite (NaN or infinity)")


def train(config: TrainConfig, splits: dict[str, FeatureSplit] | None = None, group=None) -> list[dict]:
    """Trains (or resumes) a run in ``config.out``; returns the per-epoch metrics (also in metrics.jsonl).

    ``group``: the process group of a run over several processes (None: this process alone); every rank calls
    ``train`` with the same config, and rank 0 holds the folder and writes the files.

    Raises ``UsageError`` for settings or data the run cannot use (before any work where they can be known),
    ``RunLockedError`` when another run holds ``config.out``, ``CheckpointError`` when no checkpoint verifies,
    ``NonFiniteError`` when training diverges, ``RunInterrupted`` on SIGINT / SIGTERM."""
    check_run_settings(config, reads_data=splits is None)
    first, world_size = distributed.rank(group) == 0, distributed.world_size(group)
    verbose = first and not config.quiet
    if config.tags is not None and world_size > 1:
        raise UsageError("--tags: TAGS-DC trains in one process (its heads and synthetic pool are not sharded); "
                         "run it without torchrun")
    if config.bank_size % world_size:
        raise UsageError(f"--bank-size: must divide by the number of processes {world_size}, got {config.bank_size}")
    with _run_folder(config, group) as folder:
        resumed = _resume_state(config, world_size)
        # Rank 0 alone may be busy for long (encoding features on a cold cache, evaluating, writing the
        # checkpoint): the other ranks wait for it in this group, whose timeout is long.
        patient = distributed.patient_group(group)
        if splits is None:
            with distributed.first_rank_first(patient):  # rank 0 fills the feature cache, the others read it
                splits = load_splits(config)
        _check_features(splits)
        texts, swap_test = None, None  # rank 0 evaluates; TAGS-DC runs in one process
        with distributed.first_rank_first(patient):  # rank 0 may parse and encode the swap test on a cold cache
            if first:
                from fne_fast.tags.run import run_texts

                texts, swap_test = run_texts(config, progress=not config.quiet)
        run = _Run(config, splits["train"], texts, group)
        run.inputs = {name: split.inputs for name, split in splits.items()}
        if resumed is not None:
            run.load_state_dict(resumed)
            if verbose:
                print(f"resuming {config.out} at epoch {run.next_epoch} (step {run.step})")
        metrics_path, timing_path = os.path.join(config.out, METRICS_NAME), os.path.join(config.out, TIMING_NAME)
        if first:
            folder.position = lambda: f"epoch {run.next_epoch} step {run.step}"
            write_jsonl(metrics_path, run.history)
            write_jsonl(timing_path, run.timing)
        first_epoch = run.next_epoch
        for epoch in range(run.next_epoch, config.epochs):
            started = time.perf_counter()
            timing = dict.fromkeys(("heads", "sampling_and_loss", "bank_update", "statistics"), 0.0)
            row = {"epoch": epoch, "sampler": config.sampler, "seed": config.seed}
            row.update(_train_epoch(run, splits["train"], epoch, timing))
            if run.tags:
                tags_metrics, tags_timing = run.tags.finish_epoch(epoch, run.heads, splits["train"], splits["val"])
                row.update(tags_metrics)
                timing.update(tags_timing)
            # Collective when sharded: the whole banks on rank 0, for the diagnostics over every bank row.
            banks = run.image_bank.state_dict(), run.text_bank.state_dict()
            ranks = None
            if first:  # the heads are the same on every rank: one evaluation
                row["diagnostics"] = epoch_diagnostics(run.heads, splits["train"], *banks,
                                                       run.criterion.stats.as_tensor(), run.criterion.options,
                                                       sampler=config.sampler, device=torch.device(config.device))
                ranks, swap_metrics = _test_ranks(run, splits["test"], swap_test)
                row.update(recalls_from_ranks(ranks))
                row.update(swap_metrics)
                row["val_rsum"] = _validation_rsum(run, splits["val"])
            row = distributed.broadcast_from_first(row, patient, "metrics")
            timing["epoch_seconds"] = time.perf_counter() - started
            timing["steps"] = _steps_per_epoch(config, splits["train"].text_features.shape[0], world_size)
            run.history.append(row)
            run.timing.append({"epoch": epoch, **timing})
            run.next_epoch = epoch + 1
            state = run.state_dict(banks)  # the banks have not changed since the diagnostics gathered them
            del banks
            with distributed.first_rank_first(patient):  # the other ranks wait until the files are written
                if first:
                    with folder.critical():  # a signal now takes effect once the epoch's files are all written
                        if is_best_so_far(run.history):
                            _keep_best(config.out, state, ranks, epoch)
                        save_checkpoint(config.out, state)
                        write_jsonl(metrics_path, run.history)
                        write_jsonl(timing_path, run.timing)
                        if run.tags:
                            from fne_fast.tags.run import write_examples

                            write_examples(config.out, run.tags)
            if verbose:
                print(_epoch_line(row), flush=True)
        # A finished run resumed with nothing left to train (an interrupted compare, restarted) keeps its plots.
        if config.plots and run.history and first and (run.next_epoch > first_epoch or not _has_plots(config.out)):
            from fne_fast.plots import write_run_plots

            write_run_plots(config.out, run.heads, splits["test"], run.history, config.options,
                            torch.device(config.device))
    return run.history


@contextlib.contextmanager
def _run_folder(config: TrainConfig, group):
    """The run's folder (``RunFolder``: its lock, clean SIGINT / SIGTERM), held by rank 0 for all ranks; the other
    ranks get None. Under several processes the ranks first agree that rank 0 took the folder and that they all
    run the same settings, so a refusal is the same error on every rank."""
    if distributed.world_size(group) == 1:
        with RunFolder(config.out) as folder:
            yield folder
        return
    with contextlib.ExitStack() as stack:
        folder, problem = None, None
        if distributed.rank(group) == 0:
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


def _has_plots(out: str) -> bool:
    from fne_fast.plots import RUN_PLOTS

    return all(os.path.exists(os.path.join(out, name)) for name in RUN_PLOTS)


def _epoch_line(row: dict) -> str:
    fn_rate = "n/a" if row["fn_rate"] is None else f"{100 * row['fn_rate']:.1f}%"
    swap = "n/a" if row.get("swap_acc") is None else f"{row['swap_acc']:.1f}%"
    return (f"epoch {row['epoch']}{' (warm-up)' if row['warmup'] else ''}: loss {row['loss']:.4f}  "
            f"i2t R@1/5/10 {row['i2t_r1']:.1f}/{row['i2t_r5']:.1f}/{row['i2t_r10']:.1f}  "
            f"t2i R@1/5/10 {row['t2i_r1']:.1f}/{row['t2i_r5']:.1f}/{row['t2i_r10']:.1f}  rsum {row['rsum']:.1f}  "
            f"FN rate {fn_rate}  fallback {100 * row['fallback_rate']:.1f}%  swap {swap}")
