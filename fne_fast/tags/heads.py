"""The three word-level heads of TAGS-DC and the losses.

Each head reads a word's frozen MiniLM state together with the *online* image embedding of the matcher (the
image head's output), so the generator's masked-word loss, the discrimination loss and the correction loss also
train the matcher's image head, as the authors' heads share UNITER with the matcher.

* generator: masked word -> the original word (the MLM loss); sampled at temperature 1.5 to refill spans;
* discriminator: each word of a synthetic sentence -> changed or not (class weights 1.0 / 0.11);
* corrector: each changed word -> the original word.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional

from fne_fast.tags.vocab import UNKNOWN

__all__ = ["WordHead", "TagsHeads", "sample_words", "synthetic_ranking_loss", "discrimination_loss",
           "word_loss", "DISCRIMINATION_WEIGHTS"]

# (unchanged, changed): the authors' weights; changed words are the rare class of a synthetic sentence.
DISCRIMINATION_WEIGHTS = (0.11, 1.0)


class WordHead(nn.Module):
    """[LayerNorm(word state), image embedding · √dim] -> Linear -> GELU -> Linear -> logits. The image embedding
    is unit-norm; the √dim scale gives its entries the magnitude of the normalised word state's."""

    def __init__(self, word_dim: int, image_dim: int, hidden_dim: int, classes: int):
        super().__init__()
        self.image_scale = image_dim ** 0.5
        self.word_norm = nn.LayerNorm(word_dim)
        self.layers = nn.Sequential(nn.Linear(word_dim + image_dim, hidden_dim), nn.GELU(),
                                    nn.Linear(hidden_dim, classes))

    def forward(self, word_states: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """``word_states`` [N, word_dim], ``image`` [N, image_dim] -> logits [N, classes]."""
        return self.layers(torch.cat([self.word_norm(word_states), image * self.image_scale], dim=-1))


class TagsHeads(nn.Module):
    def __init__(self, word_dim: int, image_dim: int, vocabulary_size: int, hidden_dim: int = 512):
        super().__init__()
        self.generator = WordHead(word_dim, image_dim, hidden_dim, vocabulary_size)
        self.discriminator = WordHead(word_dim, image_dim, hidden_dim // 2, 2)
        self.corrector = WordHead(word_dim, image_dim, hidden_dim, vocabulary_size)


def sample_words(logits: torch.Tensor, temperature: float, num_samples: int,
                 generator: torch.Generator) -> torch.Tensor:
    """[P, V] logits -> [P, num_samples] word ids drawn independently from softmax(logits / temperature), never
    the unknown word."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    scaled = (logits.detach().float() / temperature).index_fill(1, torch.tensor([UNKNOWN], device=logits.device),
                                                                 float("-inf"))
    return torch.multinomial(scaled.softmax(dim=1), num_samples, replacement=True, generator=generator)


def synthetic_ranking_loss(image: torch.Tensor, caption: torch.Tensor, synthetic: torch.Tensor,
                           valid: torch.Tensor, margin: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Hinge of each image against its caption versus its synthetic sentences: ``image``, ``caption`` [B, D]
    unit embeddings, ``synthetic`` [B, m, D], ``valid`` [B, m] bool (rows may have fewer than m). Returns the
    mean hinge over the valid pairs and, per pair, whether the caption already scored higher."""
    positive = (image * caption).sum(dim=1, keepdim=True)
    negative = torch.einsum("bd,bmd->bm", image, synthetic)
    weight = valid.to(negative.dtype)
    hinge = (margin + negative - positive).clamp(min=0) * weight
    return hinge.sum() / weight.sum().clamp(min=1), (negative < positive) & valid


def discrimination_loss(logits: torch.Tensor, changed: torch.Tensor) -> torch.Tensor:
    """Weighted cross-entropy of the changed / unchanged label of each word ([W, 2] logits, [W] bool), averaged
    over the words as the authors do (not over the weights)."""
    weight = torch.tensor(DISCRIMINATION_WEIGHTS, dtype=logits.dtype, device=logits.device)
    losses = functional.cross_entropy(logits, changed.long(), weight=weight, reduction="none")
    return losses.sum() / max(logits.shape[0], 1)


def word_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the vocabulary, averaged over the targets inside it (the unknown word is left out)."""
    known = (targets != UNKNOWN).to(logits.dtype)
    losses = functional.cross_entropy(logits, targets, reduction="none")
    return (losses * known).sum() / known.sum().clamp(min=1)
