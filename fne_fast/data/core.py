"""The data types every loader and the feature cache share: the split formats, the format error, and the
helpers that split data sets and fingerprint their content."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

__all__ = ["DatasetFormatError", "RawSplit", "FeatureSplit", "SPLITS", "DATASETS", "group_ids", "hash_split",
           "content_fingerprint", "first_nonfinite_row"]

SPLITS = ("train", "val", "test")
DATASETS = ("emoji", "tuxpaint", "wordnet", "albef-json", "features")


class DatasetFormatError(ValueError):
    """A source file is missing or malformed; the message names the file and, where it applies, the line."""

    def __init__(self, path, reason: str, line: int | None = None):
        where = f"{path}:{line}" if line is not None else f"{path}"
        super().__init__(f"{where}: {reason}")
        self.path, self.line, self.reason = str(path), line, reason


@dataclass
class RawSplit:
    """One split before encoding.

    ``images[i]`` is what the image-side encoder reads for item i: a zero-argument callable returning a PIL
    image when ``image_modality == "image"``, a string when it is ``"text"`` (WordNet pairs lemmas with glosses).
    ``caption_image[t]`` is the item caption t describes; ``image_group[i]`` names item i's semantic group (items
    of one group are natural false negatives of each other), or the list is None where the data has none.
    ``fingerprint`` hashes what selects the split's items (their names and captions, or, where the files fix them,
    the loader's settings: WordNet's limit and count); ``sources`` names the files they were read from,
    in groups (``{"font": [path], "annotations": [path, path]}``), which ``fne_fast.runs.fingerprint`` hashes by
    content: together they key the feature cache.
    """

    dataset: str
    split: str
    images: Sequence
    captions: list[str]
    caption_image: list[int]
    image_group: list[str] | None
    fingerprint: str
    image_modality: str = "image"
    image_names: list[str] = field(default_factory=list)
    sources: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self):
        if len(self.captions) != len(self.caption_image):
            raise ValueError(f"{self.dataset}/{self.split}: {len(self.captions)} captions but "
                             f"{len(self.caption_image)} caption_image entries")
        if self.image_group is not None and len(self.image_group) != len(self.images):
            raise ValueError(f"{self.dataset}/{self.split}: {len(self.images)} images but "
                             f"{len(self.image_group)} groups")


@dataclass
class FeatureSplit:
    """Frozen-backbone features of one split: what the heads are trained and evaluated on.

    ``image_group`` holds integer group ids (one per image) or is None where the data has no groups. ``inputs``
    is the record of what the features were made from (``fne_fast.runs.fingerprint``), or None for features built in
    memory.
    """

    image_features: torch.Tensor  # [I, D_image] float32 (a trunk's outputs when the tops train: [I, C, h, w])
    text_features: torch.Tensor  # [T, D_text] float32 (a trunk's: [T, L, 385], token states and mask)
    caption_image: torch.Tensor  # [T] int64, in [0, I)
    image_group: torch.Tensor | None  # [I] int64
    inputs: dict | None = None

    def __post_init__(self):
        num_images = self.image_features.shape[0]
        if self.text_features.shape[0] != self.caption_image.shape[0]:
            raise ValueError(f"{self.text_features.shape[0]} text features but {self.caption_image.shape[0]} "
                             "caption_image entries")
        if self.caption_image.numel() and not (0 <= int(self.caption_image.min())
                                               and int(self.caption_image.max()) < num_images):
            raise ValueError(f"caption_image must index the {num_images} images")
        if self.image_group is not None and self.image_group.shape[0] != num_images:
            raise ValueError(f"image_group has {self.image_group.shape[0]} entries for {num_images} images")

    def first_nonfinite(self) -> tuple[str, int] | None:
        """``("image_features" | "text_features", row)`` of the first row holding a NaN or an infinity, or None."""
        for name in ("image_features", "text_features"):
            row = first_nonfinite_row(getattr(self, name))
            if row is not None:
                return name, row
        return None

    def first_images(self, limit: int) -> "FeatureSplit":
        """The first ``limit`` images and their captions: what a loader's ``limit`` would have encoded (loaders
        keep items in order), taken from the full split's cached features instead of encoding a new subset."""
        keep = self.caption_image < limit
        return FeatureSplit(self.image_features[:limit], self.text_features[keep], self.caption_image[keep],
                            None if self.image_group is None else self.image_group[:limit], self.inputs)


def first_nonfinite_row(features) -> int | None:
    """The first row of a tensor or array (2-D, or more: a trunk's outputs) that holds a NaN or an infinity, or
    None."""
    import numpy as np

    if features.shape[0] == 0:
        return None
    rows = features.reshape(features.shape[0], -1)
    finite = np.isfinite(rows).all(axis=1) if isinstance(features, np.ndarray) else (
        torch.isfinite(rows).all(dim=1).cpu().numpy())
    bad = np.flatnonzero(~finite)
    return int(bad[0]) if bad.size else None


def group_ids(names: list[str] | None) -> torch.Tensor | None:
    """Integer ids for group names, numbered in order of first appearance."""
    if names is None:
        return None
    numbering: dict[str, int] = {}
    return torch.tensor([numbering.setdefault(name, len(numbering)) for name in names], dtype=torch.int64)


def hash_split(key: str, val_fraction: float = 0.1, test_fraction: float = 0.15) -> str:
    """The split a group belongs to, from a hash of its name: stable whatever else the data set holds, so
    adding items never moves existing groups between splits, and every member of a group lands together."""
    import hashlib

    bucket = int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big") / 2.0**64
    if bucket < test_fraction:
        return "test"
    if bucket < test_fraction + val_fraction:
        return "val"
    return "train"


def content_fingerprint(*parts) -> str:
    """A short hash of the strings and numbers that define a split's content (the feature cache's key)."""
    import hashlib

    digest = hashlib.sha1()
    for part in parts:
        digest.update(repr(part).encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()[:16]
