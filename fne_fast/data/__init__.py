"""Image–text pair data sets that exist offline (DESIGN.md §4) and the one feature format training runs on.

Each loader turns its source files into ``RawSplit``s (what to encode); ``fne_fast.data.features`` encodes them
once with the frozen backbones into ``FeatureSplit``s (what training and evaluation read) and caches those.
"""

from __future__ import annotations

from fne_fast.data.core import (DATASETS, SPLITS, DatasetFormatError, FeatureSplit, RawSplit,  # noqa: F401
                                content_fingerprint, group_ids, hash_split)

__all__ = ["DatasetFormatError", "RawSplit", "FeatureSplit", "SPLITS", "DATASETS", "load_raw_split"]


def load_raw_split(dataset: str, split: str, **options) -> RawSplit:
    """The ``RawSplit`` of a named data set (not "features", which is already encoded)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if dataset == "emoji":
        from fne_fast.data.emoji import load_emoji
        return load_emoji(split, **options)
    if dataset == "tuxpaint":
        from fne_fast.data.tuxpaint import load_tuxpaint
        return load_tuxpaint(split, **options)
    if dataset == "wordnet":
        from fne_fast.data.wordnet import load_wordnet
        return load_wordnet(split, **options)
    if dataset == "albef-json":
        from fne_fast.data.albef_json import load_albef_json
        return load_albef_json(split, **options)
    raise ValueError(f"dataset must be one of {DATASETS[:-1]} here, got {dataset!r}")
