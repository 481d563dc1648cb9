"""Use a trained matcher: embed images and texts with the frozen backbones and a run's heads, score them, and
search a data set's split.

    matcher = fne_fast.load_matcher("runs/emoji-fne")          # a run folder, or one of its checkpoint files
    matcher.score(["cat.png"], ["a cat face", "a red heart"])   # [1, 2] cosine similarities

Checkpoints are read by ``fne_fast.checkpoint`` (verified safetensors, never unpickled).
"""

from __future__ import annotations

import os
from functools import lru_cache

import torch

from fne_fast.models import MatchingHeads

__all__ = ["Matcher", "load_matcher", "matcher_from_state", "top_matches",
           "backbone_text_encoder"]

# Data sets whose "images" are texts (both sides go through the text backbone).
_TEXT_IMAGE_DATASETS = ("wordnet",)


@lru_cache(maxsize=2)
def backbone_text_encoder(device: str):
    """The frozen text backbone, loaded once per process and device."""
    from fne_fast.models import TextEncoder

    return TextEncoder(device)


@lru_cache(maxsize=2)
def _image_encoder(image_size: int, device: str):
    from fne_fast.models import ImageEncoder

    return ImageEncoder(image_size, device)


def _heads_from_state(state: dict) -> MatchingHeads:
    """Rebuilds the heads with the widths their weights have."""
    image_dim = state["image_head.layers.0.weight"].shape[0]
    text_dim = state["text_head.layers.0.weight"].shape[0]
    hidden_dim, joint_dim = state["image_head.layers.1.weight"].shape[0], state["image_head.layers.3.weight"].shape[0]
    heads = MatchingHeads(image_dim, text_dim, joint_dim, hidden_dim)
    heads.load_state_dict(state)
    return heads.eval()


def _load_image(item):
    from PIL import Image

    if isinstance(item, Image.Image):
        return item.convert("RGB")
    if isinstance(item, (str, os.PathLike)):
        from fne_fast.data.tuxpaint import load_stamp_image

        if not os.path.isfile(item):
            raise FileNotFoundError(f"image {os.fspath(item)!r}: no such file")
        return load_stamp_image(os.fspath(item))  # PNG/JPEG with transparency onto white, or SVG
    raise TypeError(f"images must be paths or PIL images, got {type(item).__name__}")


def _as_list(items, name: str) -> list:
    if isinstance(items, (str, os.PathLike)) or not hasattr(items, "__iter__"):
        raise TypeError(f"{name} must be a list (got a single {type(items).__name__}: wrap it in [...])")
    return list(items)


class Matcher:
    """The heads of a run over the frozen backbones. Embeddings are unit vectors; ``score`` is their dot product,
    the similarity training and evaluation use."""

    def __init__(self, heads: MatchingHeads, *, dataset: str, image_size: int, device="cpu"):
        self.device = torch.device(device)
        self.heads = heads.to(self.device).eval()
        self.dataset, self.image_size = dataset, image_size

    @torch.no_grad()
    def embed_image_features(self, features: torch.Tensor) -> torch.Tensor:
        """Image-side backbone features [N, D_image] -> joint embeddings [N, D]."""
        return self.heads.image_head(features.to(self.device, torch.float32))

    @torch.no_grad()
    def embed_text_features(self, features: torch.Tensor) -> torch.Tensor:
        """Text backbone features [N, 384] -> joint embeddings [N, D]."""
        return self.heads.text_head(features.to(self.device, torch.float32))

    def _require_backbones(self) -> None:
        if self.dataset == "features":
            raise ValueError("this checkpoint was trained on precomputed features: its backbones are unknown, so "
                             "pass features to embed_image_features / embed_text_features instead")

    def encode_texts(self, texts) -> torch.Tensor:
        """Joint embeddings [N, D] of a list of strings."""
        texts = _as_list(texts, "texts")
        self._require_backbones()
        if not all(isinstance(text, str) for text in texts):
            raise TypeError("texts must be a list of strings")
        if not texts:
            return torch.empty(0, self.heads.text_head.layers[-1].out_features, device=self.device)
        return self.embed_text_features(backbone_text_encoder(str(self.device)).encode(texts))

    def encode_images(self, images) -> torch.Tensor:
        """Joint embeddings [N, D] of a list of image paths or PIL images (of strings, for WordNet's lemmas)."""
        images = _as_list(images, "images")
        self._require_backbones()
        if not images:
            return torch.empty(0, self.heads.image_head.layers[-1].out_features, device=self.device)
        if self.dataset in _TEXT_IMAGE_DATASETS:
            return self.embed_image_features(backbone_text_encoder(str(self.device)).encode(images))
        pixels = [_load_image(item) for item in images]
        return self.embed_image_features(_image_encoder(self.image_size, str(self.device)).encode(pixels))

    def score(self, images, texts) -> torch.Tensor:
        """[len(images), len(texts)] similarities."""
        return self.encode_images(images) @ self.encode_texts(texts).T


def matcher_from_state(state: dict, device=None) -> Matcher:
    """The matcher of a checkpoint's state (``fne_fast.checkpoint.open_checkpoint``)."""
    config = state["config"]
    return Matcher(_heads_from_state(state["heads"]), dataset=config["dataset"], image_size=config["image_size"],
                   device=device or config["device"])


def load_matcher(checkpoint, device=None) -> Matcher:
    """The matcher a training run saved: ``checkpoint`` is its run folder (the latest checkpoint that verifies;
    ``best.safetensors`` is the best-validation epoch's) or one checkpoint file."""
    from fne_fast.checkpoint import open_checkpoint

    return matcher_from_state(open_checkpoint(os.fspath(checkpoint))[0], device)


@torch.no_grad()
def top_matches(query: torch.Tensor, candidates: torch.Tensor, top: int) -> list[tuple[int, float]]:
    """(index, score) of the ``top`` candidate embeddings [N, D] most similar to one query embedding [D]."""
    best = (candidates @ query).topk(min(top, candidates.shape[0]))
    return list(zip(best.indices.tolist(), best.values.tolist()))
