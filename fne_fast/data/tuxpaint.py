"""Tux Paint stamps (Debian tuxpaint-stamps-default): each stamp's image with the English line of its .txt file.

Transparent PNGs are composited onto white and SVGs are rasterised with cairosvg (``fne_fast.data.images``). Stamps
with the same caption (e.g. two frogs, both "A frog.") form a semantic group; splits are drawn by group.
"""

from __future__ import annotations

import os
import re

from fne_fast.data.core import DatasetFormatError, RawSplit, content_fingerprint, hash_split
from fne_fast.data.images import load_image_file

__all__ = ["load_tuxpaint", "read_caption", "DEFAULT_ROOT"]

DEFAULT_ROOT = "/usr/share/tuxpaint/stamps"


def read_caption(path: str) -> str:
    """The English caption: the first line of a stamp's .txt file (later lines are other languages)."""
    try:
        with open(path, encoding="utf-8") as stream:
            first = stream.readline()
    except UnicodeDecodeError as error:
        raise DatasetFormatError(path, f"not UTF-8 text ({error.reason})", 1) from error
    caption = first.strip()
    if not caption or "=" in caption.split(" ")[0]:
        raise DatasetFormatError(path, "the first line must be the English caption, got "
                                       f"{first.strip()[:60]!r}", 1)
    return caption


def _group(caption: str) -> str:
    return re.sub(r"[^a-z0-9 ]+", "", caption.lower()).strip()


def load_tuxpaint(split: str, *, root: str = DEFAULT_ROOT, limit: int | None = None) -> RawSplit:
    """Stamps of one split; a stamp is a .txt caption file beside a .png or .svg of the same name."""
    if not os.path.isdir(root):
        raise DatasetFormatError(root, "stamps directory not found (install Debian's tuxpaint-stamps-default, e.g. "
                                       "with scripts/setup_data.sh, or pass --data-root)")
    images, captions, caption_image, groups, names, stamp_files = [], [], [], [], [], []
    for directory, subdirectories, files in os.walk(root):
        subdirectories.sort()
        for name in sorted(files):
            if not name.endswith(".txt"):
                continue
            stem = os.path.join(directory, name[:-4])
            image_path = next((stem + ext for ext in (".png", ".svg") if os.path.exists(stem + ext)), None)
            if image_path is None:
                continue
            caption = read_caption(stem + ".txt")
            group = _group(caption)
            if hash_split(group) != split:
                continue
            if limit is not None and len(images) >= limit:
                break
            captions.append(caption)
            caption_image.append(len(images))
            groups.append(group)
            names.append(os.path.relpath(image_path, root))
            stamp_files += [image_path, stem + ".txt"]
            images.append(lambda image_path=image_path: load_image_file(image_path))
    if not images:
        raise DatasetFormatError(root, f"no stamp with a caption and an image in split {split!r}")
    fingerprint = content_fingerprint("tuxpaint", names, captions)
    return RawSplit("tuxpaint", split, images, captions, caption_image, groups, fingerprint, image_names=names,
                    sources={"stamps": stamp_files})
