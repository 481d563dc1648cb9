"""Use a trained matcher: embed images and texts with the frozen backbones and a run's heads (and the backbone
layers a ``--finetune`` run trained), score them, and search a data set's split.

    matcher = fne_fast.load_matcher("runs/emoji-fne")          # a run folder, or one of its checkpoint files
    matcher.score(["cat.png"], ["a cat face", "a red heart"])   # [1, 2] cosine similarities

Checkpoints are read by ``fne_fast.runs.checkpoint`` (verified safetensors, never unpickled).
"""

from __future__ import annotations

import os

import torch

from fne_fast.data import FeatureSplit, RawSplit
from fne_fast.data.images import load_image
from fne_fast.models import LazyEncoders, MatchingHeads, backbone_tops, image_side_modality
from fne_fast.runs.checkpoint import open_checkpoint

__all__ = ["Matcher", "load_matcher", "matcher_from_state", "heads_from_state", "top_matches", "search"]


def _as_list(items, name: str) -> list:
    if isinstance(items, (str, os.PathLike)) or not hasattr(items, "__iter__"):
        raise TypeError(f"{name} must be a list (got a single {type(items).__name__}: wrap it in [...])")
    return list(items)


class Matcher:
    """The heads of a run over the frozen backbones (over their trunks, below the trained tops, for a
    ``--finetune`` run). Embeddings are unit vectors; ``score`` is their dot product, the similarity training and
    evaluation use."""

    def __init__(self, heads: MatchingHeads, *, dataset: str, image_size: int, device="cpu", finetune: int = 0):
        self.device = torch.device(device)
        self.heads = heads.to(self.device).eval()
        self.dataset, self.image_size, self.finetune = dataset, image_size, finetune

    @torch.no_grad()
    def embed_image_features(self, features: torch.Tensor) -> torch.Tensor:
        """Image-side backbone features [N, D_image] (trunk outputs for a ``--finetune`` run) -> joint embeddings
        [N, D]."""
        return self.heads.image_head(features.to(self.device, torch.float32))

    @torch.no_grad()
    def embed_text_features(self, features: torch.Tensor) -> torch.Tensor:
        """Text backbone features [N, 384] (trunk outputs for a ``--finetune`` run) -> joint embeddings [N, D]."""
        return self.heads.text_head(features.to(self.device, torch.float32))

    def _encoders(self) -> LazyEncoders:
        return LazyEncoders(self.image_size, str(self.device), finetune=self.finetune)

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
            return torch.empty(0, self.heads.joint_dim, device=self.device)
        return self.embed_text_features(self._encoders().text.encode(texts))

    def encode_images(self, images) -> torch.Tensor:
        """Joint embeddings [N, D] of a list (or sequence) of images: paths (PNG, JPEG, SVG), PIL images, or what a
        data split's ``images`` holds (``load_emoji("test").images``: the lazy loaders); of strings, for WordNet's
        lemmas."""
        images = _as_list(images, "images")
        self._require_backbones()
        if not images:
            return torch.empty(0, self.heads.joint_dim, device=self.device)
        encoders = self._encoders()
        if image_side_modality(self.dataset) == "text":
            return self.embed_image_features(encoders.text.encode(images))
        return self.embed_image_features(encoders.image.encode([load_image(item) for item in images]))

    def score(self, images, texts) -> torch.Tensor:
        """[len(images), len(texts)] similarities."""
        return self.encode_images(images) @ self.encode_texts(texts).T


def heads_from_state(state: dict, device="cpu") -> MatchingHeads:
    """The trained heads of a checkpoint's state, with the backbone tops of a ``--finetune`` run, on ``device``."""
    config = state["config"]
    tops = {}
    if config.get("finetune"):
        tops = dict(zip(("image_top", "text_top"), backbone_tops(
            config["finetune"], config["dataset"], config["image_size"], device,
            config.get("finetune_precision", "float32"))))  # a run saved before the field trained in float32
    return MatchingHeads.from_state_dict(state["heads"], **tops).to(device)


def matcher_from_state(state: dict, device=None) -> Matcher:
    """The matcher of a checkpoint's state (``fne_fast.runs.checkpoint.open_checkpoint``)."""
    config = state["config"]
    device = device or config["device"]
    return Matcher(heads_from_state(state, device), dataset=config["dataset"], image_size=config["image_size"],
                   device=device, finetune=config.get("finetune", 0))


def load_matcher(checkpoint, device=None) -> Matcher:
    """The matcher a training run saved: ``checkpoint`` is its run folder (the latest checkpoint that verifies;
    ``best.safetensors`` is the best-validation epoch's) or one checkpoint file."""
    return matcher_from_state(open_checkpoint(os.fspath(checkpoint))[0], device)


@torch.no_grad()
def top_matches(query: torch.Tensor, candidates: torch.Tensor, top: int) -> list[tuple[int, float]]:
    """(index, score) of the ``top`` candidate embeddings [N, D] most similar to one query embedding [D]."""
    best = (candidates @ query).topk(min(top, candidates.shape[0]))
    return list(zip(best.indices.tolist(), best.values.tolist()))


def search(matcher: Matcher, split: FeatureSplit, raw: RawSplit | None, *, text: str | None = None, image=None,
           top: int = 5, limit: int | None = None) -> list[tuple[float, str]]:
    """(score, label) of the ``top`` images of ``split`` that match ``text``, or of its captions that match
    ``image`` (a path or PIL image), best first. ``raw`` is the split before encoding, whose image names and
    captions label the results (None for precomputed features: the labels are row numbers); ``limit`` is the run's
    ``--limit``, which keeps the first images and their captions (``FeatureSplit.first_images``)."""
    if (text is None) == (image is None):
        raise ValueError("search needs exactly one of text and image")
    names = captions = None
    if raw is not None:
        names = raw.image_names
        captions = [caption for caption, item in zip(raw.captions, raw.caption_image) if limit is None or item < limit]
    caption_image = split.caption_image.tolist()
    first_caption = {}
    for row, item in enumerate(caption_image):
        first_caption.setdefault(item, row)

    def image_label(item: int) -> str:
        if names is None:
            return f"image {item}"
        caption = captions[first_caption[item]] if item in first_caption else ""
        return f"{names[item]}  ({caption})"

    def caption_label(row: int) -> str:
        caption = captions[row] if captions is not None else f"caption {row}"
        return f"{caption}  [{image_label(caption_image[row])}]"

    if text is not None:
        query, candidates, label = (matcher.encode_texts([text])[0], matcher.embed_image_features(split.image_features),
                                    image_label)
    else:
        query, candidates, label = (matcher.encode_images([image])[0],
                                    matcher.embed_text_features(split.text_features), caption_label)
    return [(score, label(index)) for index, score in top_matches(query, candidates, top)]
