"""``RunState``: the evolving state of one training run (heads, optimiser, banks, loss and its statistics,
TAGS-DC, counters, metrics so far) and its checkpoint; and the checks a resumption makes before any data is read.

A checkpoint at the end of each epoch holds everything that evolves, and every source of randomness is a function
of the seed and a counter, so a resumed run continues to exactly the numbers of an uninterrupted one. One process's
checkpoint holds its whole banks; under several processes each rank writes its banks' rows into its own file
(``fne_fast.runs.shards``), which the checkpoint names. Either resumes with any number of processes of the same
global batch, each rank reading only the rows it holds.
"""

from __future__ import annotations

import dataclasses

import torch

from fne_fast.data import FeatureSplit
from fne_fast.errors import UsageError
from fne_fast.models import MatchingHeads, backbone_tops
from fne_fast.ops import SamplerOptions
from fne_fast.runs.artifacts import CHECKPOINT_NAME, refuse_legacy_checkpoint
from fne_fast.runs.checkpoint import CheckpointError, has_checkpoint, load_checkpoint, stored_digest
from fne_fast.runs.fingerprint import differences
from fne_fast.runs.shards import bank_reference, is_sharded, read_bank_rows, write_shard
from fne_fast.sampling import distributed
from fne_fast.sampling.bank import MemoryBank
from fne_fast.sampling.loss import FNELoss
from fne_fast.sampling.thresholds import ThresholdTable
from fne_fast.tags import TagsOptions
from fne_fast.tags.run import make_trainer
from fne_fast.training.config import PER_PROCESS_FIELDS, RESUMABLE_FIELDS, TrainConfig
from fne_fast.training.data import sampler_labels
from fne_fast.training.staleness import BankLedger

__all__ = ["RunState", "resume_state"]


class RunState:
    """The evolving state of one training run over ``group`` (None: one process), and its checkpoint."""

    def __init__(self, config: TrainConfig, train_split: FeatureSplit, texts=None, group=None):
        self.config, self.group = config, group
        self.world_size, self.rank = distributed.world_size(group), distributed.rank(group)
        self.device = torch.device(config.device)
        # The trained tops are copies of the pretrained layers (loading them draws no random numbers after the
        # seed); their input is the trunks' outputs, their output the backbones' features.
        image_top, text_top = (backbone_tops(config.finetune, config.dataset, config.image_size, self.device,
                                             config.finetune_precision)
                               if config.finetune else (None, None))
        torch.manual_seed(config.seed)
        self.heads = MatchingHeads(image_top.dim if image_top else train_split.image_features.shape[1],
                                   text_top.dim if text_top else train_split.text_features.shape[1],
                                   config.joint_dim, config.hidden_dim, config.momentum, image_top=image_top,
                                   text_top=text_top).to(self.device)
        # The heads alone: DDP averages the ranks' gradients (the momentum copies have none); the loss is scaled so
        # that the average is the global batch's gradient (fne_fast/sampling/loss.py). With tops, whose training
        # amplifies rounding, each step sums the ranks' gradients in a fixed order instead (training.units).
        self.batch_invariant = bool(config.finetune)
        self.model = self.heads if group is None or self.batch_invariant else (
            torch.nn.parallel.DistributedDataParallel(
                self.heads, device_ids=[torch.cuda.current_device()] if self.device.type == "cuda" else None,
                process_group=group))
        # With the tops (5 M parameters at --finetune 1) the fused Adam is about 18 ms a step faster than the loop
        # over tensors (20 ms, 2 CPU threads, emoji); a run of the heads alone keeps the loop, and its numbers.
        self.optimizer = torch.optim.Adam(self.heads.head_parameters(), lr=config.lr,
                                          fused=True if config.finetune else None)
        if config.finetune:
            self.optimizer.add_param_group({"params": self.heads.top_parameters(), "lr": config.backbone_lr})
        self._learning_rates = [group["lr"] for group in self.optimizer.param_groups]
        # Which pair and step each bank row came from, for the staleness of the rows (tops that train only).
        self.ledger = BankLedger(config.bank_size) if config.finetune else None
        # Language guidance: each row keeps its pair's frozen caption embedding (the text features, normalised).
        guide_dim = train_split.text_features.shape[1] if config.options.guide_threshold is not None else 0
        self.image_bank, self.text_bank = (MemoryBank(config.bank_size, config.joint_dim,
                                                      dtype=config.bank_torch_dtype, device=self.device, group=group,
                                                      guide_dim=guide_dim)
                                           for _ in range(2))
        self.thresholds = None
        if config.threshold_share is not None:
            # One threshold per identity the sampler excludes by (an image, or a group with --oracle), per direction.
            identity_of_caption, _ = sampler_labels(train_split, config.oracle)
            items = int(identity_of_caption.max()) + 1 if identity_of_caption.numel() else 1
            self.thresholds = tuple(ThresholdTable(items, share=config.threshold_share, lr=config.threshold_lr,
                                                   device=self.device) for _ in range(2))
        self.criterion = FNELoss(config.sampler, config.options, seed=config.seed,
                                 stats_momentum=config.stats_momentum, backend=config.backend, device=self.device,
                                 group=group, agree_each_step=False,  # the ranks' settings agreed at the start
                                 inbatch_weight=config.inbatch_weight, thresholds=self.thresholds,
                                 attract_weight=config.attract_weight, attract_k=config.attract_k,
                                 batch_invariant=self.batch_invariant)
        self.tags = None
        if config.tags is not None:
            self.tags = make_trainer(config.tags, texts, train_split, seed=config.seed, device=self.device,
                                     joint_dim=config.joint_dim, lr=config.lr, progress=not config.quiet,
                                     cache_dir=config.cache_dir, export=config.tags_export is not None,
                                     group=group, finetune=config.finetune)
        self.next_epoch = 0
        self.step = 0
        self.history: list[dict] = []
        self.timing: list[dict] = []  # kept in the checkpoint, so timing.jsonl is rewritten like metrics.jsonl
        self.inputs: dict[str, dict | None] = {}  # each split's record of its source files (runs.fingerprint)

    def scale_learning_rates(self, scale: float) -> None:
        """Every parameter group's learning rate at ``scale`` times the configured one (a resumed optimiser's stored
        rates are replaced too)."""
        for group, rate in zip(self.optimizer.param_groups, self._learning_rates):
            group["lr"] = rate * scale

    @property
    def trained_parameters(self) -> list[torch.nn.Parameter]:
        """Every parameter the optimiser steps, in its groups' order."""
        return [parameter for group in self.optimizer.param_groups for parameter in group["params"]]

    @property
    def first(self) -> bool:
        """Whether this process is rank 0, which holds the folder, evaluates and writes the files."""
        return self.rank == 0

    def state_dict(self) -> dict | None:
        """The state on rank 0, None elsewhere. Collective when sharded: every rank first writes its banks' rows
        into its own file, which the state names."""
        if self.world_size > 1:
            image_bank, text_bank = self._write_bank_shards()
        else:
            image_bank, text_bank = self.image_bank.state_dict(), self.text_bank.state_dict()
        if not self.first:
            return None
        return {"config": dataclasses.asdict(self.config), "world_size": self.world_size,
                "next_epoch": self.next_epoch, "step": self.step,
                "heads": self.heads.state_dict(), "optimizer": self.optimizer.state_dict(),
                "image_bank": image_bank, "text_bank": text_bank,
                "stats": self.criterion.stats.state_dict(), "torch_rng": torch.get_rng_state(),
                "history": self.history, "timing": self.timing, "inputs": self.inputs,
                "tags": self.tags.state_dict() if self.tags else None,
                "ledger": self.ledger.state_dict() if self.ledger else None,
                "thresholds": [table.state_dict() for table in self.thresholds] if self.thresholds else None}

    def _write_bank_shards(self) -> tuple[dict, dict] | tuple[None, None]:
        """Every rank writes its rows of both banks into its own checkpoint file; rank 0 gets the banks'
        references (files, digests, rows), the others None. A rank that cannot write stops every rank with the
        same error, before anything names the new files."""
        problem, digest = None, "0" * 64
        try:
            digest = write_shard(self.config.out, self.step, self.rank, self.world_size,
                                 {"image_bank": self.image_bank.shard_state(),
                                  "text_bank": self.text_bank.shard_state()})
        except OSError as error:
            problem = f"cannot write its checkpoint file: {error}"
        table = distributed.agree("writing the checkpoint's bank files", _digest_numbers(digest), problem,
                                  self.group, self.device, error=OSError)
        if not self.first:
            return None, None
        digests = [_digest_text(line) for line in table]
        return (bank_reference(self.image_bank, self.step, digests),
                bank_reference(self.text_bank, self.step, digests))

    def load_state_dict(self, state: dict) -> None:
        """The state of a checkpoint whose settings ``resume_state`` compared before the data was read; its
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
        if self.ledger:
            self.ledger.load_state_dict(state["ledger"])
        for table, table_state in zip(self.thresholds or (), state.get("thresholds") or ()):
            table.load_state_dict(table_state)
        self.next_epoch, self.step, self.history = state["next_epoch"], state["step"], list(state["history"])
        self.timing = list(state["timing"])


def _check_same_settings(state: dict, config: TrainConfig, world_size: int) -> None:
    skipped = RESUMABLE_FIELDS + PER_PROCESS_FIELDS
    # A setting added after the checkpoint was written had its default then, in the nested option groups too (a
    # sampler option such as guide_threshold added later).
    stored = {**dataclasses.asdict(TrainConfig()), **state["config"]}
    for key, group in (("options", SamplerOptions), ("tags", TagsOptions)):
        if isinstance(stored.get(key), dict):
            stored[key] = {**dataclasses.asdict(group()), **stored[key]}
    stored = {key: value for key, value in stored.items() if key not in skipped}
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


def _digest_numbers(digest: str) -> list[int]:
    """A SHA-256's 64 hex digits as four signed 64-bit integers (an agreement row's values)."""
    return [int(digest[i:i + 16], 16) - (1 << 64 if int(digest[i], 16) >= 8 else 0) for i in range(0, 64, 16)]


def _digest_text(numbers: list[int]) -> str:
    return "".join(f"{number % (1 << 64):016x}" for number in numbers)


def _bank_rows_reader(config: TrainConfig, world_size: int, group):
    """``load_checkpoint``'s ``accept``: replaces a checkpoint's sharded banks by this rank's rows, read from
    their files; when any rank's files do not verify, every rank refuses the checkpoint (and falls back to the
    previous one together)."""
    rank, rows = distributed.rank(group), config.bank_size // world_size

    def accept(state: dict) -> str | None:
        _check_same_settings(state, config, world_size)  # a changed bank size is a usage error, not damage
        problem = None
        try:
            sharded = {name: state[name] for name in ("image_bank", "text_bank") if is_sharded(state[name])}
            state.update(read_bank_rows(config.out, sharded, rank * rows, (rank + 1) * rows))
        except CheckpointError as error:
            problem = str(error)
        if world_size > 1:
            try:
                distributed.agree("--resume: reading the checkpoint's bank files", [], problem, group,
                                  torch.device(config.device))
            except ValueError as error:
                return str(error)
        return problem

    return accept


def resume_state(config: TrainConfig, world_size: int, group=None) -> tuple[dict, str] | None:
    """(The checkpoint state to continue from: verified, settings compared, this rank's bank rows read; the
    SHA-256 of the checkpoint file it came from), or None for a new run; refuses to overwrite a run without
    ``resume``. Reads no data, so a wrong setting stops the run before any work. Collective when ``group`` has
    several ranks."""
    refuse_legacy_checkpoint(config.out)
    if not has_checkpoint(config.out):
        return None
    if not config.resume:
        raise UsageError(f"--out: {config.out} already holds a run ({CHECKPOINT_NAME}); pass --resume to continue "
                         "it, or choose another --out")
    state, path = load_checkpoint(config.out, accept=_bank_rows_reader(config, world_size, group))
    return state, stored_digest(path)
