"""``TrainConfig``: everything that defines a training run, each setting's default, check and help text written once.

Every field made with ``fne_fast.fields.option`` is a flag of ``fne-fast train`` (``--bank-size`` for
``bank_size``; ``fne_fast.cli.parser`` builds them from these fields), and a bad value raises ``UsageError`` naming
that flag as soon as the config is built, before any data is read. The nested records bring their own flags: the
sampler's options (``SamplerOptions``: ``--k``, ``--fn-tau``, …), TAGS-DC's (``TagsOptions``: ``--tags-…``) and the
data set's files (``data_options``: ``fne_fast.data.DATA_FLAGS``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from fne_fast.data import DATASETS
from fne_fast.errors import UsageError
from fne_fast.fields import (check_bool, check_choice, check_count, check_text, field_problems, flag_name,
                             is_integer, is_number, option, store_floats)
from fne_fast.models import IMAGE_DEPTH, TEXT_DEPTH, TOP_PRECISIONS
from fne_fast.ops import BACKENDS, SamplerOptions
from fne_fast.ops.checks import EMBEDDING_DTYPES, dtype_name
from fne_fast.sampling.loss import SAMPLERS, sampler_mode
from fne_fast.tags import TagsOptions

__all__ = ["TrainConfig", "BANK_DTYPES", "RESUMABLE_FIELDS", "PER_PROCESS_FIELDS"]

# The banks store what the op reads: its embedding dtypes, by name.
BANK_DTYPES = {dtype_name(dtype): dtype for dtype in EMBEDDING_DTYPES}
# Settings that may differ between a run and its resumption without changing its numbers.
RESUMABLE_FIELDS = ("epochs", "resume", "out", "cache_dir", "plots", "quiet", "tags_export")
# Not compared directly on resume: the global batch, batch_size × processes, is.
PER_PROCESS_FIELDS = ("batch_size",)


def _check_integer(value) -> str | None:
    return None if is_integer(value) else "must be an integer"


def _check_learning_rate(value) -> str | None:
    return None if is_number(value) and math.isfinite(value) and value > 0 else "must be finite and > 0"


def _check_momentum(value) -> str | None:
    return None if is_number(value) and 0.0 <= value < 1.0 else "must be in [0, 1)"


def _check_finetune(value) -> str | None:
    # The same number of top layers trains in both backbones: at most the shallower one's depth.
    deepest = min(TEXT_DEPTH, IMAGE_DEPTH)
    return None if is_integer(value) and 0 <= value <= deepest else (
        f"must be an integer in [0, {deepest}] (MiniLM has {TEXT_DEPTH} layers, EfficientNet-Lite0 {IMAGE_DEPTH} "
        "blocks)")


def _check_weight(value) -> str | None:
    return None if is_number(value) and math.isfinite(value) and value >= 0 else "must be finite and >= 0"


def _check_share(value) -> str | None:
    return None if value is None or (is_number(value) and 0.0 < value < 1.0) else "must be in (0, 1)"


def _check_stats_momentum(value) -> str | None:
    # An EMA needs a momentum strictly inside (0, 1) (fne_fast.RunningStats); None is the authors' running mean.
    return None if value is None or (is_number(value) and 0.0 < value < 1.0) else "must be in (0, 1)"


@dataclass
class TrainConfig:
    """Everything that defines a run. ``options`` are the sampler's (their ``mode`` follows ``sampler``); a dict is
    accepted for them and for ``tags``, as a checkpoint stores them. Raises ``UsageError`` naming the flag of the
    first bad field; ``fne_fast.training.preflight.check_run_settings`` checks what depends on the machine
    (device, backend, folders, data files) when the run starts."""

    dataset: str = option("emoji", check_choice(DATASETS), "the data set (features: precomputed arrays in "
                                                           "--features-dir)", choices=DATASETS)
    sampler: str = option("fne", check_choice(SAMPLERS), "the negative sampler: fne, hardest and uniform draw from "
                                                         "the bank; inbatch-hardest is VSE++'s in-batch max "
                                                         "violation", choices=SAMPLERS)
    options: SamplerOptions = field(default_factory=SamplerOptions)
    inbatch_weight: float = option(0.0, _check_weight, "a bank sampler's loss adds VSE++'s in-batch max violation "
                                                       "with this weight (0: the bank term alone)")
    oracle: bool = option(False, check_bool, "exclude every candidate of the anchor's semantic group, by the data's "
                                             "labels, in the bank and in the batch: the upper bound of any "
                                             "false-negative criterion (data with groups only)")
    threshold_share: float | None = option(None, _check_share,
                                           "GloFND's thresholds: each training item's own threshold is learned "
                                           "so that this share of its bank candidates lies above it, and the "
                                           "candidates above are excluded (default: off)")
    threshold_lr: float = option(0.02, _check_learning_rate, "the largest step of an item's threshold per visit "
                                                             "of the item (similarity units)")
    attract_weight: float = option(0.0, _check_weight, "FNC's attraction: the bank candidates that the relative "
                                                       "cut or the thresholds exclude also enter the hinge as "
                                                       "extra positives, with this weight (0: only removed)")
    attract_k: int = option(1, check_count(1), "the most similar excluded candidates each anchor attracts")
    bank_size: int = option(8224, check_count(1), "rows of each memory bank (the authors' 8224); divides by the "
                                                  "number of processes")
    epochs: int = option(5, check_count(1), "including the warm-up epoch(s)")
    warmup_epochs: int = option(1, check_count(0), "first epochs trained with in-batch max violation (no bank)")
    batch_size: int = option(32, check_count(1), "pairs per step and process")
    lr: float = option(5e-4, _check_learning_rate, "Adam's learning rate of the heads")
    finetune: int = option(0, _check_finetune, "train the top N layers of both backbones (MiniLM's transformer "
                                               "layers, EfficientNet-Lite0's blocks) with the heads; 0: the heads "
                                               "alone, over frozen features")
    finetune_precision: str = option("float32", check_choice(tuple(TOP_PRECISIONS)),
                                     "what the layers --finetune trains compute their matrix products and "
                                     "convolutions in (bfloat16: autocast, 2-3x faster products on CPUs with "
                                     "AVX-512 BF16 or AMX and on GPUs; weights, optimiser and heads stay float32)",
                                     choices=tuple(TOP_PRECISIONS))
    backbone_lr: float = option(5e-5, _check_learning_rate, "Adam's learning rate of the backbone layers "
                                                            "--finetune trains")
    device: str = option("cpu", check_text(), "cpu or cuda")
    seed: int = option(0, _check_integer, "seed of the heads' initialisation, the shuffle and the op's noise")
    out: str = option("runs/emoji-fne", check_text(), "the run's folder (checkpoints, metrics.jsonl, plots)")
    resume: bool = option(False, check_bool, "continue the run in --out from its last checkpoint (same numbers as "
                                             "one run)")
    stats_momentum: float | None = option(None, _check_stats_momentum, "EMA momentum of the running statistics "
                                                                       "(default: the authors' running mean)")
    momentum: float = option(0.995, _check_momentum, "momentum of the key heads")
    joint_dim: int = option(256, check_count(1), "width of the joint embedding space")
    hidden_dim: int = option(1024, check_count(1), "hidden width of the projection heads")
    bank_dtype: str = option("float32", check_choice(tuple(BANK_DTYPES)), "storage dtype of the banks",
                             choices=tuple(BANK_DTYPES))
    backend: str = option("auto", check_choice(BACKENDS), "the op's backend", choices=BACKENDS)
    image_size: int = option(128, check_count(1), "pixels fed to EfficientNet-Lite0")
    limit: int | None = option(None, check_count(1, optional=True), "use at most this many items per split")
    eval_limit: int | None = option(None, check_count(1, optional=True),
                                    "use at most this many items of the validation and test splits (the training "
                                    "split stays whole)")
    steps_per_epoch: int | None = option(None, check_count(1, optional=True),
                                         "cap on the batches of each epoch (default: one pass over the training "
                                         "pairs)")
    data_options: dict = field(default_factory=dict)  # the data set's files: fne_fast.data.DATA_FLAGS
    tags: TagsOptions | None = None  # TAGS-DC beside the sampler (None: off)
    cache_dir: str | None = option(None, check_text(optional=True), "feature cache (default: $FNE_FAST_CACHE or "
                                                                    "~/.cache/fne_fast)")
    plots: bool = option(True, check_bool, "plots of each run (compare draws compare.png either way)")
    quiet: bool = option(False, check_bool, "no progress bars")
    tags_export: str | None = option(None, check_text(optional=True),
                                     "write TAGS-DC's kept synthetic negatives of every epoch to this JSONL file: "
                                     "each with its caption, spans, changed words and scores (needs --tags)")

    def __post_init__(self):
        for item, value, problem in field_problems(self):
            raise UsageError(f"{flag_name(item.name)}: {problem}, got {value!r}")
        if self.tags_export is not None and self.tags is None:
            raise UsageError("--tags-export: writes TAGS-DC's synthetic negatives; add --tags")
        if self.finetune and self.dataset == "features":
            raise UsageError("--finetune: --dataset features holds precomputed features, with no backbone to train")
        if self.finetune_precision != "float32" and not self.finetune:
            raise UsageError("--finetune-precision: sets what the layers --finetune trains compute in; add "
                             "--finetune N (N >= 1)")
        store_floats(self)
        if isinstance(self.options, dict):
            self.options = SamplerOptions(**self.options)
        self.options = self.options.replace(mode=sampler_mode(self.sampler))
        if self.options.guide_threshold is not None and self.finetune:
            raise UsageError("--guide-threshold: language guidance compares the frozen text embeddings of the "
                             "captions, which a run with --finetune does not hold; run it with --finetune 0")
        if self.options.guide_threshold is not None and self.sampler == "inbatch-hardest":
            raise UsageError("--guide-threshold: guides the bank's draws, and sampler inbatch-hardest draws none")
        if self.attract_weight and self.options.relative_cut is None and self.threshold_share is None:
            raise UsageError("--attract-weight: attraction needs a false-negative criterion to detect what it "
                             "attracts: --relative-cut or --threshold-share")
        if isinstance(self.tags, dict):
            self.tags = TagsOptions(**self.tags)

    @property
    def bank_torch_dtype(self) -> torch.dtype:
        return BANK_DTYPES[self.bank_dtype]
