"""Flickr30K / MS-COCO in the authors' (ALBEF) JSON layout, for users who bring those files.

Training file: a list of ``{"image": path, "caption": str, "image_id": any}``, one entry per caption. Evaluation
files (val/test): a list of ``{"image": path, "caption": [str, ...]}``, one entry per image (5 captions each in
Flickr30K and COCO). Image paths are relative to ``image_root``. These data sets have no semantic groups.
"""

from __future__ import annotations

import json
import os

from fne_fast.data.core import DatasetFormatError, RawSplit, content_fingerprint

__all__ = ["load_albef_json"]


def _read_entries(path: str) -> list:
    if not os.path.isfile(path):
        raise DatasetFormatError(path, "file not found")
    try:
        with open(path, encoding="utf-8") as stream:
            entries = json.load(stream)
    except json.JSONDecodeError as error:
        raise DatasetFormatError(path, f"invalid JSON: {error.msg} (column {error.colno})", error.lineno) from error
    if not isinstance(entries, list):
        raise DatasetFormatError(path, f"expected a JSON list of entries, got {type(entries).__name__}", 1)
    return entries


def _field(path: str, number: int, entry, key: str, kinds: tuple):
    if not isinstance(entry, dict) or key not in entry:
        raise DatasetFormatError(path, f"entry {number}: missing {key!r}")
    value = entry[key]
    if not isinstance(value, kinds):
        raise DatasetFormatError(path, f"entry {number}: {key!r} must be {' or '.join(k.__name__ for k in kinds)}, "
                                       f"got {type(value).__name__}")
    return value


def _open_image(path: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise DatasetFormatError(path, f"unreadable image ({error})") from error


def load_albef_json(split: str, *, train_json: str | None = None, val_json: str | None = None,
                    test_json: str | None = None, image_root: str | None = None,
                    limit: int | None = None) -> RawSplit:
    """One split from its JSON file; ``limit`` keeps the first ``limit`` images."""
    path = {"train": train_json, "val": val_json, "test": test_json}[split]
    if path is None:
        raise ValueError(f"albef-json needs --{split}-json (the {split} split's file)")
    if image_root is None:
        raise ValueError("albef-json needs --image-root (the directory the entries' image paths are under)")
    entries = _read_entries(path)
    image_index: dict[str, int] = {}
    image_paths, captions, caption_image = [], [], []
    for number, entry in enumerate(entries):
        image = _field(path, number, entry, "image", (str,))
        if split == "train":
            _field(path, number, entry, "image_id", (str, int))
            texts = [_field(path, number, entry, "caption", (str,))]
        else:
            texts = _field(path, number, entry, "caption", (list, str))
            texts = [texts] if isinstance(texts, str) else texts
            if not texts or not all(isinstance(text, str) for text in texts):
                raise DatasetFormatError(path, f"entry {number}: 'caption' must be a non-empty list of strings")
        if image not in image_index:
            if limit is not None and len(image_index) >= limit:
                continue
            full_path = os.path.join(image_root, image)
            if not os.path.isfile(full_path):
                raise DatasetFormatError(path, f"entry {number}: image {full_path} not found")
            image_index[image] = len(image_paths)
            image_paths.append(full_path)
        for text in texts:
            captions.append(text)
            caption_image.append(image_index[image])
    if not image_paths:
        raise DatasetFormatError(path, "no entries")
    fingerprint = content_fingerprint("albef-json", limit, list(image_index), captions)
    loaders = [lambda full_path=full_path: _open_image(full_path) for full_path in image_paths]
    return RawSplit("albef-json", split, loaders, captions, caption_image, None, fingerprint,
                    image_names=list(image_index), sources={"json": [path], "images": image_paths})
