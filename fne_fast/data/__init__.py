"""Image–text pair data sets that exist offline (docs/DESIGN.md §4) and the one feature format training runs on.

Each loader turns its source files into ``RawSplit``s (what to encode); ``fne_fast.data.features`` encodes them
once with the frozen backbones into ``FeatureSplit``s (what training and evaluation read) and caches those.
"""

from __future__ import annotations

from fne_fast.data.core import (DATASETS, SPLITS, DatasetFormatError, FeatureSplit, RawSplit,  # noqa: F401
                                content_fingerprint, group_ids, hash_split)
from fne_fast.fields import flag_name

__all__ = ["DatasetFormatError", "RawSplit", "FeatureSplit", "SPLITS", "DATASETS", "DATA_OPTIONS", "DATA_FLAGS",
           "data_option_flag", "load_raw_split"]

# The options each loader takes from a run (``TrainConfig.data_options``), by data set.
DATA_OPTIONS = {"emoji": ("cldr_root", "font_path"), "tuxpaint": ("root",), "wordnet": ("root",),
                "albef-json": ("train_json", "val_json", "test_json", "image_root"), "features": ("features_dir",)}
# The command-line flag and help of each data option that has one (emoji's font and annotations have none: they
# are the Debian packages' files).
DATA_FLAGS = {"root": ("--data-root", "tuxpaint: stamps directory; wordnet: dict directory"),
              "train_json": ("--train-json", "albef-json: training file"),
              "val_json": ("--val-json", "albef-json: validation file"),
              "test_json": ("--test-json", "albef-json: test file"),
              "image_root": ("--image-root", "albef-json: directory the image paths are under"),
              "features_dir": ("--features-dir", "features: directory of {split}_*.npy arrays")}


def data_option_flag(name: str) -> str:
    """The flag that names a data option in a message (``--data-root`` for ``root``)."""
    return DATA_FLAGS[name][0] if name in DATA_FLAGS else flag_name(name)


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
