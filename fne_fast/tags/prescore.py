"""A cheap pre-score of synthetic sentences, measured before anything relies on it.

Encoding a synthetic sentence with the frozen text backbone is what limits the pool (2.4–4 ms a sentence on one
core), so drawing the authors' 20 × 20 refills per caption would need a score that picks the hardest refills
without encoding them. The pre-score here estimates a sentence's embedding from its caption's: each changed word
moves it by the difference of the two words' own embeddings (the backbone run over the word alone, the cached
word table), scaled by the sentence's length, as a mean over the words would move, then L2-normalised. The
matcher scores that estimate as it scores a real embedding.

``agreement`` compares the pre-score with the matcher's score of the real embeddings over an epoch's pool: the
mean Spearman correlation within each caption's candidates (the choice it would make is per caption), and how many
of each caption's ``keep`` hardest it finds among its own top ``keep``.
"""

from __future__ import annotations

import torch

from fne_fast.tags.pool import SyntheticPool
from fne_fast.tags.vocab import UNKNOWN, Vocabulary

__all__ = ["estimated_embeddings", "agreement", "pool_agreement"]


def estimated_embeddings(caption_features: torch.Tensor, changes: list[tuple[tuple[int, str, str], ...]],
                         lengths: torch.Tensor, word_features: torch.Tensor, vocabulary: Vocabulary) -> torch.Tensor:
    """[K, D] the estimated embedding of each candidate: ``caption_features`` [K, D] its caption's embedding,
    ``changes`` its (position, original, new) words, ``lengths`` [K] its number of words, ``word_features``
    [V, D] each vocabulary word's own embedding (a word outside the vocabulary moves nothing)."""
    old, new, owner = [], [], []
    for candidate, candidate_changes in enumerate(changes):
        for _, original, replacement in candidate_changes:
            old.append(vocabulary.id(original))
            new.append(vocabulary.id(replacement))
            owner.append(candidate)
    device = caption_features.device
    old, new = torch.tensor(old, dtype=torch.int64, device=device), torch.tensor(new, dtype=torch.int64, device=device)
    known = ((old != UNKNOWN) & (new != UNKNOWN)).unsqueeze(1)
    shift = torch.where(known, word_features[new] - word_features[old], 0.0)
    moved = torch.zeros_like(caption_features).index_add_(0, torch.tensor(owner, dtype=torch.int64, device=device),
                                                          shift)
    estimate = caption_features + moved / lengths.to(caption_features).clamp(min=1).unsqueeze(1)
    return torch.nn.functional.normalize(estimate, dim=1)


def _ranks(values: torch.Tensor) -> torch.Tensor:
    return values.argsort().argsort().double()


def agreement(prescores: torch.Tensor, scores: torch.Tensor, owner: torch.Tensor, keep: int) -> dict:
    """``prescores``, ``scores`` [K] of the candidates, ``owner`` [K] their caption: the mean within-caption
    Spearman correlation (captions with at least 3 candidates) and the share of each caption's ``keep``
    highest-scoring candidates that are among its ``keep`` highest pre-scores (captions with more than ``keep``
    candidates, where the choice matters). None where no caption qualifies."""
    correlations, found, chosen = [], 0, 0
    for caption in owner.unique().tolist():
        rows = torch.nonzero(owner == caption).flatten()
        if rows.numel() >= 3:
            estimated, real = _ranks(prescores[rows]), _ranks(scores[rows])
            estimated, real = estimated - estimated.mean(), real - real.mean()
            correlations.append(float((estimated * real).sum() / (estimated.norm() * real.norm())))
        if rows.numel() > keep:
            hardest = set(rows[scores[rows].topk(keep).indices].tolist())
            found += len(hardest & set(rows[prescores[rows].topk(keep).indices].tolist()))
            chosen += keep
    return {"tags_prescore_spearman": sum(correlations) / len(correlations) if correlations else None,
            "tags_prescore_recall": 100.0 * found / chosen if chosen else None}


@torch.no_grad()
def pool_agreement(pool: SyntheticPool, image: torch.Tensor, scores: torch.Tensor, caption_features: torch.Tensor,
                   word_features: torch.Tensor, text_head, vocabulary: Vocabulary, keep: int) -> dict:
    """``agreement`` over an epoch's pool: ``image`` [P, D] each pool caption's image embedding, ``scores`` [K] the
    matcher's scores of the real candidates, ``caption_features`` [P, D] each pool caption's backbone feature,
    ``text_head`` what maps such features into the joint space (the matcher's text head, or its projection over a
    trained top)."""
    captions = caption_features.to(image.device)[pool.candidate_owner]
    estimate = estimated_embeddings(captions, pool.changes, pool.candidates.lengths, word_features, vocabulary)
    prescores = (image[pool.candidate_owner] * text_head(estimate)).sum(dim=1)
    return agreement(prescores.cpu(), scores.cpu(), pool.candidate_owner.cpu(), keep)
