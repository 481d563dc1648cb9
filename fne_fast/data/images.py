"""Images as the image encoder reads them: RGB PIL images, from a file (PNG or JPEG with transparency composited
onto white, or SVG rasterised), from a PIL image, or from one of a split's lazy loaders."""

from __future__ import annotations

import io
import os

from fne_fast.data.core import DatasetFormatError

__all__ = ["load_image_file", "load_image"]


def load_image_file(path: str, size: int = 256):
    """An RGB PIL image: PNG or JPEG (alpha composited onto white) or SVG (rasterised at ``size`` pixels)."""
    from PIL import Image, UnidentifiedImageError

    try:
        if path.endswith(".svg"):
            import cairosvg

            # Some SVGs (Inkscape exports, such as Tux Paint's stamps) declare XML entities, which cairosvg refuses
            # unless `unsafe`; entities can read local files, so only open SVGs you would open yourself.
            png = cairosvg.svg2png(url=path, output_width=size, output_height=size, unsafe=True)
            image = Image.open(io.BytesIO(png))
        else:
            image = Image.open(path)
            image.load()
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise DatasetFormatError(path, f"unreadable image ({error})") from error
    image = image.convert("RGBA")
    background = Image.new("RGBA", image.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, image).convert("RGB")


def load_image(item):
    """An RGB PIL image from a path (``load_image_file``), a PIL image, or a zero-argument callable returning one
    (what ``RawSplit.images`` holds for the image data sets)."""
    from PIL import Image

    if isinstance(item, (str, os.PathLike)):
        if not os.path.isfile(item):
            raise FileNotFoundError(f"image {os.fspath(item)!r}: no such file")
        return load_image_file(os.fspath(item))
    if callable(item) and not isinstance(item, Image.Image):
        item = item()
    if isinstance(item, Image.Image):
        return item.convert("RGB")
    raise TypeError(f"images must be paths, PIL images or a split's image loaders, got {type(item).__name__}")
