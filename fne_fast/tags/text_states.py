"""The text backbone (MiniLM) run over sentences given as words: each sentence's embedding, computed exactly as
the cached caption features are (``TextEncoder.encode``: masked mean of the token states, L2-normalised), and one
state per word (the mean of its word pieces' states), which the generator, the discriminator and the corrector
read.

Over frozen backbones (``encode_words``) both are computed once. When ``--finetune`` trains MiniLM's top layers
they are the trunk TAGS-DC shares with the matcher: ``encode_trunk_words`` keeps each sentence's trunk token
states below those layers and which word each piece belongs to (``TrunkWords``), and ``top_word_states`` runs
the trained top over them, with autograd in a training step."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["WordStates", "TrunkWords", "encode_words", "encode_trunk_words", "top_word_states"]


@dataclass
class WordStates:
    """Sentence embeddings [N, D] and the states of every word of every sentence, packed: sentence i's words are
    rows ``starts[i] : starts[i] + lengths[i]`` of ``states`` [W, D]. Under a trained top, ``trunk`` holds what
    the top reads to compute them again (the embeddings and states are the top's when the sentences were
    encoded)."""

    embeddings: torch.Tensor
    states: torch.Tensor
    starts: torch.Tensor
    lengths: torch.Tensor
    trunk: "TrunkWords | None" = None

    def to(self, device) -> "WordStates":
        return WordStates(self.embeddings.to(device), self.states.to(device), self.starts.to(device),
                          self.lengths.to(device), None if self.trunk is None else self.trunk.to(device))


@dataclass
class TrunkWords:
    """The trunk's token states of N sentences below the trained top, packed as the top reads them ([N, L, 385],
    channel 384 the attention mask), and ``piece_word`` [N, L]: the word (0 … its sentence's length - 1) each
    slot's piece belongs to, -1 for [CLS], [SEP], padding and pieces of no word; ``lengths`` [N] the sentences'
    words."""

    packed: torch.Tensor
    piece_word: torch.Tensor
    lengths: torch.Tensor

    def to(self, device) -> "TrunkWords":
        return TrunkWords(self.packed.to(device), self.piece_word.to(device), self.lengths.to(device))

    def rows(self, sentence: int) -> slice:
        start = int(self.starts[sentence])
        return slice(start, start + int(self.lengths[sentence]))


def _word_ranges(words: tuple[str, ...], spaces: tuple[str, ...]) -> list[tuple[int, int]]:
    ranges, cursor = [], 0
    for word, space in zip(words, spaces):
        ranges.append((cursor, cursor + len(word)))
        cursor += len(word) + len(space)
    return ranges


def _tokenised_batches(text_encoder, sentences, batch_size: int, progress: str | None):
    """The sentences' texts tokenised in batches of similar length (less padding): yields (the batch's sentence
    indices, the tokeniser's output on the encoder's device, the pieces' character offsets [b, L] on the host)."""
    from tqdm import tqdm

    texts = ["".join(word + space for word, space in zip(words, spaces)) for words, spaces in sentences]
    order = sorted(range(len(texts)), key=lambda index: (len(texts[index]), index))
    with tqdm(total=len(texts), desc=progress or "", unit="sentence", disable=progress is None,
              leave=False) as bar:
        for first in range(0, len(order), batch_size):
            batch = order[first:first + batch_size]
            encoded = text_encoder.tokenizer([texts[index] for index in batch], padding=True, truncation=True,
                                             max_length=text_encoder.max_length, return_offsets_mapping=True,
                                             return_tensors="pt")
            offsets = encoded.pop("offset_mapping")
            yield batch, encoded.to(text_encoder.device), offsets
            bar.update(len(batch))


@torch.no_grad()
def encode_words(text_encoder, sentences: list[tuple[tuple[str, ...], tuple[str, ...]]], *,
                 batch_size: int = 32, progress: str | None = None) -> WordStates:
    """``sentences``: (words, spaces) pairs; the result is in the input order. ``text_encoder`` is a
    ``fne_fast.models.TextEncoder``. Emoji captions took 2.4 ms a sentence on one thread in batches of 32, 2.7 ms
    in batches of 128."""
    dim = text_encoder.dim
    embeddings = torch.empty(len(sentences), dim)
    lengths = torch.tensor([len(words) for words, _ in sentences], dtype=torch.int64)
    starts = torch.cumsum(lengths, 0) - lengths
    states = torch.zeros(int(lengths.sum()), dim)
    for batch, encoded, offsets in _tokenised_batches(text_encoder, sentences, batch_size, progress):
        token_states = text_encoder.network(**encoded).last_hidden_state
        mask = encoded["attention_mask"].unsqueeze(-1).to(token_states.dtype)
        pooled = (token_states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        embeddings[batch] = nn.functional.normalize(pooled, dim=-1).float().cpu()
        token_states = token_states.float().cpu()
        for row, index in enumerate(batch):
            _pool_words(token_states[row], offsets[row], encoded["attention_mask"][row].cpu(),
                        _word_ranges(*sentences[index]), states, int(starts[index]))
    return WordStates(embeddings, states, starts, lengths)


def _pool_words(token_states, offsets, attention, ranges, out, first_row) -> None:
    """Mean of the states of the word pieces inside each word's character range ([CLS], [SEP] and padding have
    empty ranges and never match); a word with no piece (cut by truncation) keeps a zero state."""
    if not ranges:
        return
    word = _piece_words(offsets, attention, ranges)
    inside = word >= 0
    sums = torch.zeros(len(ranges), token_states.shape[1]).index_add_(0, word[inside], token_states[inside])
    counts = torch.zeros(len(ranges)).index_add_(0, word[inside], torch.ones(int(inside.sum())))
    out[first_row:first_row + len(ranges)] = sums / counts.clamp(min=1).unsqueeze(1)


@torch.no_grad()
def encode_trunk_words(text_encoder, sentences: list[tuple[tuple[str, ...], tuple[str, ...]]], cut: int, top, *,
                       batch_size: int = 32, progress: str | None = None) -> WordStates:
    """``encode_words`` below a trained top: the trunk (``text_encoder``'s layers below ``cut``) runs once, and
    the embeddings and word states are ``top``'s (a ``fne_fast.models.tops.TextTop``) over its states, as it
    is now; ``trunk`` keeps the trunk's states for the top to run again."""
    lengths = torch.tensor([len(words) for words, _ in sentences], dtype=torch.int64)
    parts: list[tuple[list[int], torch.Tensor, torch.Tensor]] = []
    for batch, encoded, offsets in _tokenised_batches(text_encoder, sentences, batch_size, progress):
        attention = encoded["attention_mask"].cpu()
        states = text_encoder.network(**encoded, output_hidden_states=True).hidden_states[cut].float().cpu()
        packed = torch.cat([states, attention.unsqueeze(-1).to(states.dtype)], dim=-1)
        piece_word = torch.stack([_piece_words(offsets[row], attention[row], _word_ranges(*sentences[index]))
                                  for row, index in enumerate(batch)])
        parts.append((batch, packed, piece_word))
    width = max((packed.shape[1] for _, packed, _ in parts), default=1)
    packed_all = torch.zeros(len(sentences), width, 385)
    piece_word_all = torch.full((len(sentences), width), -1, dtype=torch.int64)
    for batch, packed, piece_word in parts:
        packed_all[batch, :packed.shape[1]] = packed
        piece_word_all[batch, :packed.shape[1]] = piece_word
    trunk = TrunkWords(packed_all, piece_word_all, lengths)
    device = next(top.parameters()).device
    embeddings, states, starts = [], [], []
    for first in range(0, len(sentences), 128):
        sentence = torch.arange(first, min(first + 128, len(sentences)))
        batch_embeddings, batch_states, _ = top_word_states(top, trunk.packed[sentence].to(device),
                                                            trunk.piece_word[sentence].to(device),
                                                            lengths[sentence].to(device))
        embeddings.append(batch_embeddings.cpu())
        states.append(batch_states.cpu())
    starts = torch.cumsum(lengths, 0) - lengths
    return WordStates(torch.cat(embeddings) if embeddings else torch.empty(0, top.dim),
                      torch.cat(states) if states else torch.empty(0, top.dim), starts, lengths, trunk)


def top_word_states(top, packed: torch.Tensor, piece_word: torch.Tensor,
                    lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``top`` over n sentences' trunk states (``TrunkWords``' ``packed`` [n, L, 385] and ``piece_word`` [n, L]
    rows; ``lengths`` [n] how many of their words to compute, 0 where none is needed): (embeddings [n, 384], word
    states [lengths.sum(), 384], each sentence's first row in them [n]), with autograd. A word's state is the mean
    of its pieces' output states, as ``encode_words`` computes it; a word with no piece keeps a zero state."""
    embeddings, tokens, positions, width = top.forward_with_tokens(packed)
    starts = torch.cumsum(lengths, 0) - lengths
    word = piece_word[:, :width].reshape(-1)[positions]
    text = torch.div(positions, width, rounding_mode="floor")
    inside = (word >= 0) & (word < lengths[text])
    row = starts[text[inside]] + word[inside]
    total = int(lengths.sum())
    sums = tokens.new_zeros(total, tokens.shape[1]).index_add(0, row, tokens[inside])
    counts = tokens.new_zeros(total).index_add(0, row, torch.ones_like(row, dtype=tokens.dtype))
    return embeddings, sums / counts.clamp(min=1).unsqueeze(1), starts


def _piece_words(offsets, attention, ranges) -> torch.Tensor:
    """[L] the word of each piece: the word whose character range holds it, -1 where none."""
    result = torch.full((offsets.shape[0],), -1, dtype=torch.int64)
    if not ranges:
        return result
    word_start = torch.tensor([start for start, _ in ranges])
    word_end = torch.tensor([end for _, end in ranges])
    piece_start, piece_end = offsets[:, 0].contiguous(), offsets[:, 1].contiguous()
    word = (torch.searchsorted(word_start, piece_start, right=True) - 1).clamp(min=0)
    inside = (attention > 0) & (piece_end > piece_start) & (piece_start >= word_start[word]) & (
        piece_end <= word_end[word])
    return torch.where(inside, word, result)
