"""How TAGS-DC reads sentences: through the frozen text backbone's features, or, when ``--finetune`` trains MiniLM's
top layers, through those layers, which TAGS-DC then shares with the matcher (the trunk), as the authors' heads
share UNITER. A step runs the trained layers, with autograd, over its captions, their candidates and their masked
versions in one pass, so the ranking hinge and the generator's, the discriminator's and the corrector's losses all
train the layers retrieval reads, and the word heads read the layers' output states."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional

from fne_fast.tags.pool import SyntheticPool
from fne_fast.tags.text_states import encode_trunk_words, encode_words, top_word_states

__all__ = ["TextPath", "StepTexts"]


@dataclass
class StepTexts:
    """What a step's sentences give: ``texts`` [C + K, D] the joint embeddings of its C captions and then its K
    candidates (with autograd), ``states`` the word states, ``candidate_rows`` [K] each candidate's first row in
    them, ``masked_states`` the step's masked words' states (None when no word head trains)."""

    texts: torch.Tensor
    states: torch.Tensor
    candidate_rows: torch.Tensor
    masked_states: torch.Tensor | None


class TextPath:
    """``text_encoder``: a zero-argument callable returning the frozen ``TextEncoder``; ``trunk_cut``: the first of
    MiniLM's layers the run trains (the matcher's text head is then a ``Tower`` over them), None for frozen."""

    def __init__(self, text_encoder, trunk_cut: int | None):
        self.text_encoder, self.trunk_cut = text_encoder, trunk_cut
        self.shares_trunk = trunk_cut is not None

    def projection(self, matching_heads):
        """What maps a backbone sentence feature into the joint space: the text head, or with a trained top its
        projection over the top (a vocabulary word's table row is the projection of its frozen embedding: the
        top over every word each step would cost more than the step's captions)."""
        return matching_heads.text_head.projection if self.shares_trunk else matching_heads.text_head

    def encoder(self, matching_heads):
        """``build_pool``'s ``encode``: the frozen backbone's states, or the trunk's kept for the trained top and
        the top's states as it is now."""
        if self.shares_trunk:
            return lambda sentences, label: encode_trunk_words(self.text_encoder(), sentences, self.trunk_cut,
                                                               matching_heads.text_head.top, progress=label)
        return lambda sentences, label: encode_words(self.text_encoder(), sentences, progress=label)

    def step_texts(self, matching_heads, pool: SyntheticPool, caption_inputs: torch.Tensor, candidates: torch.Tensor,
                   masked: torch.Tensor, word_heads: bool) -> StepTexts:
        """The step's captions (their split inputs ``caption_inputs``), ``candidates`` and ``masked`` words (pool
        indices). The ablation (no ``word_heads``) needs no word state."""
        if not self.shares_trunk:
            # One pass of the text head over the captions and their candidates (one weight gradient, not two).
            texts = matching_heads.text_head(torch.cat([caption_inputs, pool.candidates.embeddings[candidates]]))
            return StepTexts(texts, pool.candidates.states, pool.candidates.starts[candidates],
                             pool.masked_states[masked])
        device = caption_inputs.device
        versions, version_of_word = (pool.masked_version[masked].unique_consecutive(return_inverse=True)
                                     if word_heads else (masked[:0], masked[:0]))
        captions = caption_inputs.shape[0]
        parts = [(caption_inputs, torch.full(caption_inputs.shape[:2], -1, device=device),
                  torch.zeros(captions, dtype=torch.int64, device=device)),
                 (pool.candidates.trunk.packed[candidates], pool.candidates.trunk.piece_word[candidates],
                  pool.candidates.lengths[candidates] if word_heads else torch.zeros_like(candidates)),
                 (pool.masked_trunk.packed[versions], pool.masked_trunk.piece_word[versions],
                  pool.masked_trunk.lengths[versions])]
        width = max(packed.shape[1] for packed, _, _ in parts)
        packed = torch.cat([functional.pad(packed, (0, 0, 0, width - packed.shape[1])) for packed, _, _ in parts])
        piece_word = torch.cat([functional.pad(words, (0, width - words.shape[1]), value=-1)
                                for _, words, _ in parts])
        embeddings, states, starts = top_word_states(matching_heads.text_head.top, packed, piece_word,
                                                     torch.cat([lengths for _, _, lengths in parts]))
        sentences = captions + candidates.numel()
        texts = matching_heads.text_head.projection(embeddings[:sentences])
        masked_states = None
        if word_heads:
            masked_states = states[starts[sentences:][version_of_word] + pool.masked_position[masked]]
        return StepTexts(texts, states, starts[captions:sentences], masked_states)

    @torch.no_grad()
    def candidate_features(self, matching_heads, pool: SyntheticPool) -> torch.Tensor:
        """[K, 384] the pool's candidates' backbone features: the frozen backbone's, or the trained top's now."""
        candidates = pool.candidates
        if not self.shares_trunk:
            return candidates.embeddings
        top = matching_heads.text_head.top
        return torch.cat([top(candidates.trunk.packed[first:first + 128])
                          for first in range(0, candidates.trunk.packed.shape[0], 128)] or [candidates.embeddings])

    @torch.no_grad()
    def caption_features(self, matching_heads, caption_inputs: torch.Tensor) -> torch.Tensor:
        """[n, 384] captions' backbone features from their split inputs (the trained top's now, with one)."""
        return matching_heads.text_head.top(caption_inputs) if self.shares_trunk else caption_inputs

