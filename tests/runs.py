"""What the training tests share: small synthetic feature splits, written as the `features` data set's arrays,
the command line of a short run over them, and a tiny image-caption data set (coloured shapes) for the runs that
go through the real backbones."""

from __future__ import annotations

import json

import numpy as np
import torch

from fne_fast.data import FeatureSplit


def synthetic_split(seed, images=40, groups=10):
    """Images are noisy copies of their group's centre; each has two captions, noisy linear images of it."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(groups, 12, generator=generator)
    image_group = torch.arange(images) % groups
    image_features = centres[image_group] + 0.3 * torch.randn(images, 12, generator=generator)
    projection = torch.randn(12, 9, generator=torch.Generator().manual_seed(99))
    caption_image = torch.arange(images).repeat_interleave(2)
    text_features = image_features[caption_image] @ projection + 0.1 * torch.randn(2 * images, 9,
                                                                                   generator=generator)
    return FeatureSplit(image_features, text_features, caption_image, image_group)


def synthetic_splits():
    """Train (60 images, 8 steps of 16 pairs per epoch), val and test (40 images each)."""
    return {"train": synthetic_split(0, images=60), "val": synthetic_split(1), "test": synthetic_split(2)}


def write_feature_arrays(directory, splits):
    directory.mkdir()
    for name, split in splits.items():
        np.save(directory / f"{name}_image_features.npy", split.image_features.numpy())
        np.save(directory / f"{name}_text_features.npy", split.text_features.numpy())
        np.save(directory / f"{name}_caption_image.npy", split.caption_image.numpy())
        np.save(directory / f"{name}_image_group.npy", split.image_group.numpy())


def features_run_arguments(features_dir, out, epochs) -> list[str]:
    """``fne-fast train`` of a short run on the arrays in ``features_dir``."""
    return ["train", "--dataset", "features", "--features-dir", str(features_dir), "--epochs", str(epochs),
            "--batch-size", "16", "--bank-size", "64", "--min-count", "5", "--joint-dim", "16", "--hidden-dim", "32",
            "--out", str(out), "--quiet", "--no-plots"]


SHAPE_COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 170, 60), "yellow": (230, 210, 20)}


def _draw_shape(path, colour, shape, other_colour, relation):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (64, 64), "white")
    draw = ImageDraw.Draw(image)
    box = (8, 4, 32, 28)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=SHAPE_COLOURS[colour])
    other = (8, 36, 56, 44) if relation == "above" else (40, 8, 48, 56)
    draw.rectangle(other, fill=SHAPE_COLOURS[other_colour])
    image.save(path)


def write_shapes_dataset(root, cache) -> dict:
    """24 images in ``root``: a coloured shape above or beside a coloured bar; two captions each; 16 train, 4 val,
    4 test, in the albef-json layout. Returns the data options, the root, the cache folder and the items."""
    items = []
    for colour in SHAPE_COLOURS:
        for shape in ("circle", "square"):
            for relation, other in zip(("above", "beside"),
                                       ("green", "yellow") if colour in ("red", "blue") else ("red", "blue")):
                name = f"{colour}-{shape}-{relation}.png"
                _draw_shape(root / name, colour, shape, other, relation)
                items.append((name, [f"a {colour} {shape} {relation} a {other} bar",
                                     f"{shape}, {colour}, {relation} {other} bar"]))
    splits = {"train": items[:8] + items[12:], "val": items[8:10], "test": items[10:12]}
    options = {"image_root": str(root)}
    for split, entries in splits.items():
        path = root / f"{split}.json"
        if split == "train":
            rows = [{"image": name, "caption": caption, "image_id": name} for name, captions in entries
                    for caption in captions]
        else:
            rows = [{"image": name, "caption": captions} for name, captions in entries]
        path.write_text(json.dumps(rows))
        options[f"{split}_json"] = str(path)
    return {"options": options, "root": root, "cache": str(cache), "items": items}


def shapes_config(dataset: dict, out, **overrides):
    """A short run on the coloured shapes (``write_shapes_dataset``'s record) through the real backbones."""
    from fne_fast.training import TrainConfig

    values = dict(dataset="albef-json", data_options=dataset["options"], cache_dir=dataset["cache"], out=str(out),
                  epochs=3, batch_size=8, bank_size=32, joint_dim=16, hidden_dim=32, lr=1e-3, plots=False,
                  quiet=True, image_size=64)
    return TrainConfig(**{**values, **overrides})


def shapes_run_arguments(dataset: dict) -> list[str]:
    """``fne-fast train``'s command line for the coloured shapes through the real backbones (``shapes_config``'s
    data, image size and widths; batch size and output folder left to the caller)."""
    options = dataset["options"]
    return ["train", "--dataset", "albef-json", "--train-json", options["train_json"], "--val-json",
            options["val_json"], "--test-json", options["test_json"], "--image-root", options["image_root"],
            "--cache-dir", dataset["cache"], "--image-size", "64", "--bank-size", "32", "--joint-dim", "16",
            "--hidden-dim", "32", "--quiet", "--no-plots"]


def torchrun_cli(arguments: list[str], processes: int) -> None:
    """``fne-fast ARGUMENTS`` under torchrun with ``processes`` processes of one thread each (a product's rounding
    depends on the threads, so runs compared to the bit use one); fails the test with the launch's error."""
    import os
    import subprocess
    import sys

    launched = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                               str(processes), "-m", "fne_fast.cli", *arguments], capture_output=True, text=True,
                              timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert launched.returncode == 0, launched.stderr[-3000:]
