"""The three word-level heads of TAGS-DC and the losses.

Each head reads a word's frozen MiniLM state together with the *online* image embedding of the matcher (the
image head's output), so their losses also reach the matcher's image head. With tied heads (the default) the
generator and the corrector score every vocabulary word through the matcher's *text head* (``word_logits``), the
projection retrieval uses: the authors' heads share UNITER with the matcher, and this is the part of that sharing
a dual encoder over frozen backbones can have.

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
    """The generator, discriminator and corrector. With ``tied_dim`` (the joint space's width) the generator and
    the corrector output a query in the joint space, and a word's logit is the query's product with that word's
    row of a table the caller computes as the matcher's text head applied to each vocabulary word's embedding
    (``word_logits``), plus a per-word bias: their losses then train the text head retrieval uses."""

    def __init__(self, word_dim: int, image_dim: int, vocabulary_size: int, hidden_dim: int = 512,
                 tied_dim: int | None = None):
        super().__init__()
        outputs = vocabulary_size if tied_dim is None else tied_dim
        self.generator = WordHead(word_dim, image_dim, hidden_dim, outputs)
        self.discriminator = WordHead(word_dim, image_dim, hidden_dim // 2, 2)
        self.corrector = WordHead(word_dim, image_dim, hidden_dim, outputs)
        self.tied = tied_dim is not None
        if self.tied:
            self.word_bias = nn.Parameter(torch.zeros(vocabulary_size))

    def word_logits(self, head: WordHead, word_states: torch.Tensor, image: torch.Tensor,
                    word_table: torch.Tensor | None) -> torch.Tensor:
        """[N, V] logits of ``head`` (the generator or the corrector); ``word_table`` [V, D]: the text head over the
        vocabulary's embeddings when tied, else None."""
        output = head(word_states, image)
        if not self.tied:
            return output
        if word_table is None:
            raise ValueError("word_table: tied heads score words through the text head's table, got None")
        return output @ word_table.T + self.word_bias


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
