"""What the training tests share: small synthetic feature splits, written as the `features` data set's arrays,
and the command line of a short run over them."""

from __future__ import annotations

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
