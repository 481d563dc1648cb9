"""A run's data: the features of every split (the trunks' outputs when the tops train), from the cache (encoding
them with the frozen backbones on a miss) or from precomputed arrays, limited as the config asks and checked before
training starts."""

from __future__ import annotations

import torch

from fne_fast.data import SPLITS, FeatureSplit, load_raw_split
from fne_fast.data.features import cached_feature_split, default_cache_dir, load_feature_arrays
from fne_fast.errors import UsageError
from fne_fast.models import LazyEncoders
from fne_fast.training.config import TrainConfig
from fne_fast.training.preflight import check_splits

__all__ = ["load_splits", "check_features", "sampler_labels"]


def load_splits(config: TrainConfig) -> dict[str, FeatureSplit]:
    """Features of every split, from the cache (encoding them on a miss)."""
    if config.dataset == "features":
        directory = config.data_options.get("features_dir")
        if not directory:
            raise UsageError("--features-dir: --dataset features needs it")
        memo_folder = config.cache_dir or default_cache_dir()  # where the arrays' file digests are remembered
        splits = {split: load_feature_arrays(directory, split, memo_folder=memo_folder) for split in SPLITS}
    else:
        encoders = LazyEncoders(config.image_size, config.device, finetune=config.finetune)
        splits = {split: cached_feature_split(load_raw_split(config.dataset, split, **config.data_options),
                                              encoders, cache_dir=config.cache_dir, progress=not config.quiet)
                  for split in SPLITS}
    # The limit subsets the full cached features, so limited runs share one cache with full runs.
    if config.limit is not None:
        splits = {name: split.first_images(config.limit) for name, split in splits.items()}
    # A large data set's evaluation (a ranking of every test item against all others) is capped apart from its
    # training set: what a large bank needs to fill up is not what a recall needs to be precise.
    if config.eval_limit is not None:
        splits.update({name: splits[name].first_images(config.eval_limit) for name in ("val", "test")})
    return splits


def check_features(splits: dict[str, FeatureSplit]) -> None:
    """Splits given in memory are checked like loaded ones: not empty, finite."""
    check_splits(splits)
    for name, split in splits.items():
        bad = split.first_nonfinite()
        if bad is not None:
            raise UsageError(f"--dataset: row {bad[1]} of the {name} split's {bad[0]} is not finite (NaN or infinity)")


def sampler_labels(split: FeatureSplit, oracle: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(caption -> the identity the sampler excludes, identity -> semantic group or None)``: the caption's image
    and the images' groups; with ``oracle``, the caption's semantic group itself, so that the bank and the batch
    exclude every pair of the anchor's group (and each identity is its own group)."""
    if not oracle:
        return split.caption_image, split.image_group
    if split.image_group is None:
        raise UsageError("--oracle: this data set has no semantic groups to exclude by")
    groups = split.image_group
    return groups[split.caption_image], torch.arange(int(groups.max()) + 1 if groups.numel() else 0)
