"""Encoding splits with the frozen backbones, the on-disk feature cache, and precomputed feature arrays.

What is cached is the backbones' features, or, for a run that trains the backbones' top layers, the outputs of
the frozen trunks below them (feature maps, token states with their attention mask: ``fne_fast.models``). The
cache file of a split is keyed by data set, split, both encoders' versions (which carry the image size and the cut
point) and the hash of its ``inputs`` record (``fne_fast.runs.fingerprint``: the split's items and the content of
its source files), so a changed source file or encoder never serves stale features. Files are written atomically;
features are checked for NaN and infinity when encoded, read from the cache and loaded from arrays.

The encoders are passed in (``fne_fast.models.LazyEncoders`` or anything with ``image``, ``text`` and
``versions(image_modality)``): this module does not import the models.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import torch
from torch.nn import functional as nn_functional

from fne_fast.data.core import DatasetFormatError, FeatureSplit, RawSplit, first_nonfinite_row, group_ids
from fne_fast.io import atomic_save, remove_stale_temporaries
from fne_fast.runs.fingerprint import describe_sources, inputs_record, record_digest

__all__ = ["default_cache_dir", "stack_batches", "encode_texts", "encode_split", "cached_feature_split",
           "load_feature_arrays"]


def default_cache_dir() -> str:
    return os.environ.get("FNE_FAST_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "fne_fast")


def _in_batches(items, batch_size: int, description: str, progress: bool = True):
    """Yields (start, batch) slices of ``items`` while a progress bar (unless not ``progress``) counts items."""
    from tqdm import tqdm

    with tqdm(total=len(items), desc=description, unit="item", unit_scale=True, leave=False,
              disable=not progress) as bar:
        for start in range(0, len(items), batch_size):
            batch = items[start:start + batch_size]
            yield start, batch
            bar.update(len(batch))


def stack_batches(chunks: list[torch.Tensor], width: int) -> torch.Tensor:
    """The batches' outputs as one tensor. Token states (a text trunk's [n, L, 385]) of batches of different
    lengths are padded to the longest with zeros, whose mask channel marks them as padding."""
    if not chunks:
        return torch.empty(0, width)
    if chunks[0].dim() == 3:
        length = max(chunk.shape[1] for chunk in chunks)
        chunks = [nn_functional.pad(chunk, (0, 0, 0, length - chunk.shape[1])) for chunk in chunks]
    return torch.cat(chunks)


def encode_texts(encoder, texts: list[str], batch_size: int, description: str, *,
                 progress: bool = True) -> torch.Tensor:
    """``encoder.encode`` of each text, each distinct text encoded once, in batches of similar length (less
    padding), under a progress bar (unless not ``progress``)."""
    distinct = sorted(set(texts), key=lambda text: (len(text), text))
    output = stack_batches([encoder.encode(batch)
                            for _, batch in _in_batches(distinct, batch_size, description, progress)], encoder.dim)
    position = {text: row for row, text in enumerate(distinct)}
    return output[torch.tensor([position[text] for text in texts], dtype=torch.int64)]


def _encode_images(encoder, loaders, batch_size: int, description: str, progress: bool) -> torch.Tensor:
    return stack_batches([encoder.encode([load() for load in batch])
                          for _, batch in _in_batches(list(loaders), batch_size, description, progress)],
                         encoder.dim)


def encode_split(raw: RawSplit, encoders, batch_size: int = 64, *, progress: bool = True) -> FeatureSplit:
    """Features of a raw split from the frozen backbones (or their trunks' outputs: ``LazyEncoders``), under
    progress bars (unless not ``progress``)."""
    if raw.image_modality == "text":
        image_features = encode_texts(encoders.text, list(raw.images), 4 * batch_size,
                                      f"{raw.dataset}/{raw.split} image-side texts", progress=progress)
    else:
        image_features = _encode_images(encoders.image, raw.images, batch_size, f"{raw.dataset}/{raw.split} images",
                                        progress)
    text_features = encode_texts(encoders.text, raw.captions, 4 * batch_size, f"{raw.dataset}/{raw.split} captions",
                                 progress=progress)
    return FeatureSplit(image_features, text_features, torch.tensor(raw.caption_image, dtype=torch.int64),
                        group_ids(raw.image_group))


def cached_feature_split(raw: RawSplit, encoders, *, cache_dir: str | None = None,
                         progress: bool = True) -> FeatureSplit:
    """The split's features from the cache, encoding and caching them with ``encoders`` on a miss (under progress
    bars unless not ``progress``)."""
    cache_dir = cache_dir or default_cache_dir()
    remove_stale_temporaries(cache_dir, exclusive=False)  # other processes may be writing here: dead ones only
    versions = encoders.versions(raw.image_modality)
    inputs = inputs_record(sources=describe_sources(raw.sources, cache_dir), encoders=versions,
                           items=raw.fingerprint)
    path = os.path.join(cache_dir, f"{raw.dataset}-{raw.split}-{versions}-{record_digest(inputs)}.pt")
    if os.path.exists(path):
        try:
            stored = torch.load(path, map_location="cpu", weights_only=True)
            cached = FeatureSplit(**stored, inputs=inputs)
        except Exception as error:  # noqa: BLE001  (any damage to a cache entry is repaired the same way)
            warnings.warn(f"{path}: unreadable feature cache entry ({error}); encoding the split again")
        else:
            bad = cached.first_nonfinite()
            if bad is not None:
                raise DatasetFormatError(path, f"row {bad[1]} of the cached {bad[0]} is not finite (NaN or "
                                               "infinity); delete this file to encode the split again")
            return cached
    features = encode_split(raw, encoders, progress=progress)
    bad = features.first_nonfinite()
    if bad is not None:
        kind, row = bad
        item = (raw.image_names[row] if kind == "image_features" and row < len(raw.image_names)
                else raw.captions[row] if kind == "text_features" else f"item {row}")
        raise DatasetFormatError(f"{raw.dataset}/{raw.split}", f"{item!r} (row {row}) encodes to non-finite "
                                                               f"{kind.replace('_', ' ')}")
    atomic_save({"image_features": features.image_features, "text_features": features.text_features,
                 "caption_image": features.caption_image, "image_group": features.image_group}, path)
    features.inputs = inputs
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


def _read_features(path: str) -> np.ndarray:
    array = _read_array(path, ndim=2, kind="f")
    row = first_nonfinite_row(array)
    if row is not None:
        raise DatasetFormatError(path, f"row {row} is not finite (NaN or infinity)")
    return array


def load_feature_arrays(directory: str, split: str, *, memo_folder: str | None = None) -> FeatureSplit:
    """Precomputed features: ``{split}_image_features.npy`` [I, Di] float, ``{split}_text_features.npy``
    [T, Dt] float, ``{split}_caption_image.npy`` [T] int (the image of each caption) and optionally
    ``{split}_image_group.npy`` [I] int (semantic groups). The split's ``inputs`` record hashes the arrays' files
    (with the digests remembered in ``memo_folder``, the feature cache's folder, when given)."""
    prefix = os.path.join(directory, split)
    image = _read_features(f"{prefix}_image_features.npy")
    text = _read_features(f"{prefix}_text_features.npy")
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
    arrays = ("image_features", "text_features", "caption_image") + (("image_group",) if group is not None else ())
    inputs = inputs_record(sources=describe_sources({name: [f"{prefix}_{name}.npy"] for name in arrays},
                                                    memo_folder), encoders=None, items=None)
    return FeatureSplit(torch.from_numpy(image.astype(np.float32)), torch.from_numpy(text.astype(np.float32)),
                        torch.from_numpy(caption_image.astype(np.int64)), group, inputs)
