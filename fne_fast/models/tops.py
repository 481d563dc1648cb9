"""The backbones' top layers that ``--finetune N`` trains: MiniLM's top N transformer layers with its mean pooling,
and EfficientNet-Lite0's top N blocks with its head convolution and pooling. Each maps what the frozen trunk below
it gives (``fne_fast.models.backbones``: cached like features) to the backbone's feature vector, which the
projection head then maps into the joint space.

The tops always run in eval mode, also while they train: no dropout, no drop-connect, BatchNorm with the pretrained
statistics. Batch statistics and random masks would make a process's step depend on which other pairs share its
batch (W processes × B pairs would no longer follow one process × W·B) and add draws to the random state a resumed
run must replay; with batches of 32 pairs, BatchNorm's batch statistics would also be noisy.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from fne_fast.models.backbones import (ImageEncoder, TextEncoder, backbone_depth, shared_image_encoder,
                                       shared_text_encoder)

__all__ = ["TextTop", "ImageTop", "backbone_tops", "image_side_modality", "trim_token_padding"]

# Data sets whose "images" are texts: both sides go through the text backbone.
_TEXT_IMAGE_DATASETS = ("wordnet",)


def image_side_modality(dataset: str) -> str:
    """What the image side of a data set's pairs is: "text" (WordNet's lemmas) or "image"."""
    return "text" if dataset in _TEXT_IMAGE_DATASETS else "image"


def trim_token_padding(inputs: torch.Tensor) -> torch.Tensor:
    """A batch of packed token states [n, L, 385] cut to its longest text (texts are padded at the end to the
    longest of their split; the padding contributes exact zeros to attention and pooling); other inputs (image
    maps, features) unchanged. Emoji's training captions hold 38 token slots, a batch's longest about half that.
    It reads the length where the tensor is: on the host, before a batch goes to a GPU, it costs no
    synchronisation."""
    if inputs.dim() != 3 or inputs.shape[0] == 0:
        return inputs
    return inputs[:, :int(inputs[..., -1].sum(dim=1).max())]


class _EvalModeTop(nn.Module):
    """A trained top that stays in eval mode whatever ``train()`` is asked (see the module's docstring)."""

    def train(self, mode: bool = True):
        super().train(mode)
        for module in self.children():
            module.eval()
        return self


class TextTop(_EvalModeTop):
    """MiniLM's top ``layers`` transformer layers and its pooling: ``TextEncoder.encode_trunk``'s packed token
    states [n, L, 385] (channel 384 the attention mask) -> [n, 384] unit-norm sentence embeddings."""

    def __init__(self, encoder: TextEncoder, layers: int):
        super().__init__()
        self.dim = encoder.dim
        self.layers = copy.deepcopy(encoder.network.encoder.layer[-layers:])
        self.train()

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        # The layer's cost halves without the padding none of these texts needs; on a GPU the length would be a
        # host synchronisation, so there the caller trims the batch on the host first (trim_token_padding).
        if packed.device.type == "cpu":
            packed = trim_token_padding(packed)
        if packed.shape[0] == 0:
            # No texts (a process's share of an epoch's last batch): the layers run on one dropped token, so that
            # every parameter is still part of the backward pass, as DistributedDataParallel requires.
            return self(torch.ones(1, 1, packed.shape[2], dtype=packed.dtype, device=packed.device))[:0]
        states, mask = packed[..., :-1], packed[..., -1]
        # The additive mask the BERT layers take: 0 for a token, the dtype's minimum for padding.
        additive = ((1.0 - mask) * torch.finfo(states.dtype).min)[:, None, None, :]
        for layer in self.layers:
            output = layer(states, attention_mask=additive)
            states = output[0] if isinstance(output, tuple) else output
        weights = mask.unsqueeze(-1)
        pooled = (states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, dim=-1)


class ImageTop(_EvalModeTop):
    """EfficientNet-Lite0's top ``blocks`` MBConv blocks, its head convolution, BatchNorm and activation, and the
    global average pool: ``ImageEncoder.encode_trunk``'s feature maps -> [n, 1280] features."""

    def __init__(self, encoder: ImageEncoder, blocks: int):
        super().__init__()
        network = encoder.network
        self.dim = encoder.dim
        self.blocks = copy.deepcopy(network._blocks[-blocks:])
        self.head = nn.Sequential(copy.deepcopy(network._conv_head), copy.deepcopy(network._bn1),
                                  copy.deepcopy(network._swish))
        # Channels-last convolutions: a step's forward and backward over emoji's 4×4 maps took 18 ms instead of
        # 25 ms (oneDNN, 2 CPU threads).
        self.to(memory_format=torch.channels_last)
        self.train()

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        maps = maps.contiguous(memory_format=torch.channels_last)
        for block in self.blocks:
            maps = block(maps)
        return self.head(maps).mean(dim=(2, 3))


def backbone_tops(finetune: int, dataset: str, image_size: int, device="cpu") -> tuple[nn.Module, nn.Module]:
    """(image-side top, text top) with the pretrained weights of the ``finetune`` top layers, on ``device``."""
    if not 1 <= finetune <= min(backbone_depth("image"), backbone_depth("text")):
        raise ValueError(f"finetune must be in [1, {min(backbone_depth('image'), backbone_depth('text'))}], "
                         f"got {finetune}")
    text = TextTop(shared_text_encoder(str(device)), finetune)
    image = (TextTop(shared_text_encoder(str(device)), finetune) if image_side_modality(dataset) == "text"
             else ImageTop(shared_image_encoder(image_size, str(device)), finetune))
    return image.to(device), text.to(device)
