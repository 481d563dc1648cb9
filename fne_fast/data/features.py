"""Encoding splits with the frozen backbones, the on-disk feature cache, and precomputed feature arrays.

The cache file of a split is keyed by data set, split, both encoders' versions and the split's content
fingerprint, so a changed source file or encoder never serves stale features. Files are written atomically.

The encoders are passed in (``fne_fast.models.LazyEncoders`` or anything with ``image``, ``text`` and
``versions(image_modality)``): this module does not import the models.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from fne_fast.data.core import DatasetFormatError, FeatureSplit, RawSplit, group_ids
from fne_fast.io import atomic_save

__all__ = ["default_cache_dir", "encode_split", "cached_feature_split", "load_feature_arrays"]


def default_cache_dir() -> str:
    return os.environ.get("FNE_FAST_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "fne_fast")


def _in_batches(items, batch_size: int, description: str):
    """Yields (start, batch) slices of ``items`` while a progress bar counts items."""
    from tqdm import tqdm

    with tqdm(total=len(items), desc=description, unit="item", unit_scale=True, leave=False) as bar:
        for start in range(0, len(items), batch_size):
            batch = items[start:start + batch_size]
            yield start, batch
            bar.update(len(batch))


def _encode_texts(encoder, texts: list[str], batch_size: int, description: str) -> torch.Tensor:
    """Each distinct text encoded once, in batches of similar length (less padding)."""
    distinct = sorted(set(texts), key=lambda text: (len(text), text))
    output = torch.empty(len(distinct), encoder.dim)
    for start, batch in _in_batches(distinct, batch_size, description):
        output[start:start + len(batch)] = encoder.encode(batch)
    position = {text: row for row, text in enumerate(distinct)}
    return output[torch.tensor([position[text] for text in texts], dtype=torch.int64)]


def _encode_images(encoder, loaders, batch_size: int, description: str) -> torch.Tensor:
    output = torch.empty(len(loaders), encoder.dim)
    for start, batch in _in_batches(list(loaders), batch_size, description):
        output[start:start + len(batch)] = encoder.encode([load() for load in batch])
    return output


def encode_split(raw: RawSplit, encoders, batch_size: int = 64) -> FeatureSplit:
    """Features of a raw split from the frozen backbones."""
    if raw.image_modality == "text":
        image_features = _encode_texts(encoders.text, list(raw.images), 4 * batch_size,
                                       f"{raw.dataset}/{raw.split} image-side texts")
    else:
        image_features = _encode_images(encoders.image, raw.images, batch_size, f"{raw.dataset}/{raw.split} images")
    text_features = _encode_texts(encoders.text, raw.captions, 4 * batch_size, f"{raw.dataset}/{raw.split} captions")
    return FeatureSplit(image_features, text_features, torch.tensor(raw.caption_image, dtype=torch.int64),
                        group_ids(raw.image_group))


def cached_feature_split(raw: RawSplit, encoders, *, cache_dir: str | None = None) -> FeatureSplit:
    """The split's features from the cache, encoding and caching them with ``encoders`` on a miss."""
    cache_dir = cache_dir or default_cache_dir()
    name = f"{raw.dataset}-{raw.split}-{encoders.versions(raw.image_modality)}-{raw.fingerprint}.pt"
    path = os.path.join(cache_dir, name)
    if os.path.exists(path):
        stored = torch.load(path, map_location="cpu", weights_only=True)
        return FeatureSplit(**stored)
    features = encode_split(raw, encoders)
    atomic_save({"image_features": features.image_features, "text_features": features.text_features,
                 "caption_image": features.caption_image, "image_group": features.image_group}, path)
    return features


def _read_array(path: str, *, ndim: int, kind: str) -> np.ndarray:
    if not os.path.isfile(path):
        raise DatasetFormatError(path, "file not found")
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as error:
        raise DatasetFormatError(path, f"not a readable .npy array ({error})") from error
    if array.ndim != ndim or array.dtype.kind not in kind:
        raise DatasetFormatError(path, f"expected a {ndim}-D array of kind {kind!r}, got shape {array.shape} "
                                       f"dtype {array.dtype}")
    return array


def load_feature_arrays(directory: str, split: str) -> FeatureSplit:
    """Precomputed features: ``{split}_image_features.npy`` [I, Di] float, ``{split}_text_features.npy``
    [T, Dt] float, ``{split}_caption_image.npy`` [T] int (the image of each caption) and optionally
    ``{split}_image_group.npy`` [I] int (semantic groups)."""
    prefix = os.path.join(directory, split)
    image = _read_array(f"{prefix}_image_features.npy", ndim=2, kind="f")
    text = _read_array(f"{prefix}_text_features.npy", ndim=2, kind="f")
    caption_image = _read_array(f"{prefix}_caption_image.npy", ndim=1, kind="iu")
    if caption_image.shape[0] != text.shape[0]:
        raise DatasetFormatError(f"{prefix}_caption_image.npy", f"{caption_image.shape[0]} entries but "
                                 f"{text.shape[0]} rows in {split}_text_features.npy")
    if caption_image.size and (caption_image.min() < 0 or caption_image.max() >= image.shape[0]):
        raise DatasetFormatError(f"{prefix}_caption_image.npy", f"entries must index the {image.shape[0]} images")
    group = None
    if os.path.exists(f"{prefix}_image_group.npy"):
        group = _read_array(f"{prefix}_image_group.npy", ndim=1, kind="iu")
        if group.shape[0] != image.shape[0]:
            raise DatasetFormatError(f"{prefix}_image_group.npy", f"{group.shape[0]} entries for "
                                     f"{image.shape[0]} images")
        group = torch.from_numpy(group.astype(np.int64))
    return FeatureSplit(torch.from_numpy(image.astype(np.float32)), torch.from_numpy(text.astype(np.float32)),
                        torch.from_numpy(caption_image.astype(np.int64)), group)
