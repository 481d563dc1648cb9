"""Emoji: images rendered from Debian's Noto Color Emoji font, captions from Unicode CLDR's English annotations.

Each emoji gets up to two captions: its name (the CLDR "tts" annotation, e.g. "thumbs up: medium skin tone")
and its keyword list. Skin-tone, gender, hair and person/man/woman variants of one emoji share a *base emoji*:
that is the semantic group (variants are the natural false negatives), and splits are drawn by base emoji so all
variants of an emoji stay on one side.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ElementTree
from functools import lru_cache

from fne_fast.data.core import DatasetFormatError, RawSplit, content_fingerprint, hash_split

__all__ = ["load_emoji", "base_emoji", "read_annotations", "DEFAULT_FONT", "DEFAULT_CLDR"]

DEFAULT_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
DEFAULT_CLDR = "/usr/share/unicode/cldr/common"
_ANNOTATION_FILES = ("annotations/en.xml", "annotationsDerived/en.xml")
# The colour bitmaps of Noto Color Emoji exist at this one size; other sizes fail to load.
_BITMAP_FONT_SIZE = 109

_ZWJ = "\u200d"
_DROPPED = {chr(c) for c in range(0x1F3FB, 0x1F400)}  # skin-tone modifiers
_DROPPED |= {"\ufe0f", "\ufe0e", "\u2640", "\u2642"}  # variation selectors, female/male signs
_DROPPED |= {chr(c) for c in range(0x1F9B0, 0x1F9B4)}  # hair components
# Gendered people map to their neutral form, so "man health worker" and "woman health worker" are one group.
_NEUTRAL = {"\U0001F468": "\U0001F9D1", "\U0001F469": "\U0001F9D1",  # man, woman -> person
            "\U0001F466": "\U0001F9D2", "\U0001F467": "\U0001F9D2",  # boy, girl -> child
            "\U0001F474": "\U0001F9D3", "\U0001F475": "\U0001F9D3"}  # old man, old woman -> older person


def base_emoji(sequence: str) -> str:
    """The base emoji of a sequence: modifiers, gender signs and hair removed, people made neutral."""
    parts = ["".join(_NEUTRAL.get(c, c) for c in part if c not in _DROPPED) for part in sequence.split(_ZWJ)]
    return _ZWJ.join(part for part in parts if part) or sequence


def _parse_annotation_file(path: str) -> tuple[dict[str, str], dict[str, str]]:
    """(names, keywords) per code point sequence from one CLDR annotations XML file."""
    if not os.path.isfile(path):
        raise DatasetFormatError(path, "CLDR annotations file not found (install Debian's unicode-cldr-core, "
                                       "e.g. with scripts/setup_data.sh)")
    names: dict[str, str] = {}
    keywords: dict[str, str] = {}
    try:
        parser = ElementTree.XMLPullParser(events=("end",))
        with open(path, encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                parser.feed(line)
                for _, element in parser.read_events():
                    if element.tag != "annotation":
                        continue
                    sequence = element.get("cp")
                    if not sequence:
                        raise DatasetFormatError(path, "<annotation> without a cp attribute", line_number)
                    text = (element.text or "").strip()
                    if element.get("type") == "tts":
                        names[sequence] = text
                    else:
                        keywords[sequence] = ", ".join(word.strip() for word in text.split("|") if word.strip())
        parser.close()
    except ElementTree.ParseError as error:
        raise DatasetFormatError(path, f"malformed XML: {error.msg}", error.position[0]) from error
    return names, keywords


def read_annotations(cldr_root: str = DEFAULT_CLDR) -> dict[str, tuple[str, str | None]]:
    """``{sequence: (name, keywords or None)}`` from annotations/en.xml and annotationsDerived/en.xml."""
    names: dict[str, str] = {}
    keywords: dict[str, str] = {}
    for relative in _ANNOTATION_FILES:
        file_names, file_keywords = _parse_annotation_file(os.path.join(cldr_root, relative))
        names.update(file_names)
        keywords.update(file_keywords)
    return {sequence: (name, keywords.get(sequence) or None) for sequence, name in names.items() if name}


@lru_cache(maxsize=4)
def _font(font_path: str):
    from PIL import ImageFont

    if not os.path.isfile(font_path):
        raise DatasetFormatError(font_path, "emoji font not found (install Debian's fonts-noto-color-emoji, e.g. "
                                            "with scripts/setup_data.sh)")
    return ImageFont.truetype(font_path, _BITMAP_FONT_SIZE, layout_engine=ImageFont.Layout.RAQM)


def _single_glyph_width(font_path: str) -> int:
    from PIL import Image, ImageDraw

    return ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), "\U0001F600", font=_font(font_path))[2]


def has_glyph(sequence: str, font_path: str = DEFAULT_FONT) -> bool:
    """Whether the font draws the sequence as one colour glyph (a sequence it lacks falls apart into pieces
    wider than one glyph, and a character it lacks draws nothing)."""
    from PIL import Image, ImageDraw

    left, top, right, bottom = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox(
        (0, 0), sequence, font=_font(font_path), embedded_color=True)
    return bottom > top and 0 < right - left <= _single_glyph_width(font_path)


def render_emoji(sequence: str, font_path: str = DEFAULT_FONT):
    """The emoji drawn on white, as a square RGB PIL image of the font's bitmap size."""
    from PIL import Image, ImageDraw

    font = _font(font_path)
    left, top, right, bottom = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox(
        (0, 0), sequence, font=font, embedded_color=True)
    side = max(right - left, bottom - top)
    canvas = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    ImageDraw.Draw(canvas).text(((side - (right - left)) // 2 - left, (side - (bottom - top)) // 2 - top),
                                sequence, font=font, embedded_color=True)
    return canvas.convert("RGB")


def load_emoji(split: str, *, cldr_root: str = DEFAULT_CLDR, font_path: str = DEFAULT_FONT,
               limit: int | None = None) -> RawSplit:
    """The emoji of one split (train/val/test by base emoji), each with its name and keywords as captions.

    ``limit`` keeps the first ``limit`` emoji of the split (in code point order), for quick runs and tests.
    """
    annotations = read_annotations(cldr_root)
    images, captions, caption_image, groups, names = [], [], [], [], []
    for sequence in sorted(annotations):
        base = base_emoji(sequence)
        if hash_split(base) != split or not has_glyph(sequence, font_path):
            continue
        if limit is not None and len(images) >= limit:
            break
        name, keywords = annotations[sequence]
        item = len(images)
        images.append(lambda sequence=sequence: render_emoji(sequence, font_path))
        names.append(sequence)
        groups.append(base)
        for caption in (name, keywords):
            if caption:
                captions.append(caption)
                caption_image.append(item)
    if not images:
        raise DatasetFormatError(cldr_root, f"no emoji of split {split!r} both annotated and drawn by {font_path}")
    fingerprint = content_fingerprint("emoji", names, captions)
    sources = {"font": [font_path],
               "annotations": [os.path.join(cldr_root, relative) for relative in _ANNOTATION_FILES]}
    return RawSplit("emoji", split, images, captions, caption_image, groups, fingerprint, image_names=names,
                    sources=sources)
