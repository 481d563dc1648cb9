"""What TAGS-DC's word heads read that does not change during a run, computed once and cached: the masked-word
data the generator is pretrained on before the first pool (one masked version of every training caption and of
some validation captions, for its accuracy), and each vocabulary word's embedding, which tied heads pass through the
matcher's text head. Without pretraining the first epoch's refills are random words ("person running" ->
"person falafel"): its pool is built before any step."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from fne_fast.data.core import content_fingerprint
from fne_fast.io import atomic_save
from fne_fast.tags.masking import mask_caption
from fne_fast.tags.text_states import encode_words
from fne_fast.tags.vocab import UNKNOWN, Vocabulary

__all__ = ["MaskedWords", "cached_masked_words", "cached_word_embeddings", "pretrain_generator", "MASK_SEED"]

MASK_SEED = 20213  # fixed, so every run of a data set shares the cached masked words
_RULES_VERSION = 1


@dataclass
class MaskedWords:
    states: torch.Tensor  # [Q, D] the frozen state of each masked word in its masked caption
    targets: torch.Tensor  # [Q] vocabulary id of the original word
    rows: torch.Tensor  # [Q] split row of the caption it comes from


def cached_masked_words(name: str, source, vocabulary: Vocabulary, rows: list[int], text_encoder_loader,
                        encoder_version: str, cache_dir: str, mask_probability: float,
                        progress: bool = False) -> MaskedWords:
    """One masked version of each caption ``rows`` of ``source`` (a ``CaptionSource``), encoded on a miss."""
    key = content_fingerprint([source.parsed[row].to_state() for row in rows], rows, vocabulary.words, MASK_SEED,
                              mask_probability, encoder_version, _RULES_VERSION)
    path = os.path.join(cache_dir, "tags", f"masked-{name}-{key}.pt")
    if os.path.exists(path):
        state = torch.load(path, weights_only=True)
        return MaskedWords(state["states"], state["targets"], state["rows"])
    random = torch.Generator().manual_seed(MASK_SEED)
    versions = [(row, mask_caption(source.parsed[row], vocabulary, random, probability=mask_probability))
                for row in rows]
    encoded = encode_words(text_encoder_loader(), [(version.words, source.parsed[row].spaces)
                                                   for row, version in versions],
                           progress="encoding masked captions for pretraining" if progress else None)
    state_rows = [int(encoded.starts[number]) + position for number, (_, version) in enumerate(versions)
                  for position in version.positions]
    words = MaskedWords(encoded.states[state_rows],
                        torch.tensor([vocabulary.id(source.parsed[row].words[position]) for row, version in versions
                                      for position in version.positions], dtype=torch.int64),
                        torch.tensor([row for row, version in versions for _ in version.positions],
                                     dtype=torch.int64))
    atomic_save({"states": words.states, "targets": words.targets, "rows": words.rows}, path)
    return words


def cached_word_embeddings(vocabulary: Vocabulary, text_encoder_loader, encoder_version: str,
                           cache_dir: str) -> torch.Tensor:
    """[V, D] the frozen backbone's sentence embedding of each vocabulary word alone (the unknown word's row is
    zero)."""
    key = content_fingerprint(vocabulary.words, encoder_version, _RULES_VERSION)
    path = os.path.join(cache_dir, "tags", f"words-{key}.pt")
    if os.path.exists(path):
        return torch.load(path, weights_only=True)
    encoder = text_encoder_loader()
    chunks = [encoder.encode(vocabulary.words[start:start + 256]) for start in range(1, len(vocabulary), 256)]
    embeddings = torch.cat([torch.zeros(1, encoder.dim), *(chunk.float().cpu() for chunk in chunks)])
    atomic_save(embeddings, path)
    return embeddings


def pretrain_generator(logits_of, parameters, train: MaskedWords, train_image: torch.Tensor, *, epochs: int,
                       lr: float, random: torch.Generator, batch_size: int = 256) -> None:
    """``epochs`` of Adam on the masked-word loss: ``logits_of(states, image)`` -> [N, V]; ``train_image`` [Q, D]
    the (fixed) image embedding of each masked word's caption; ``random`` orders the batches."""
    from fne_fast.tags.heads import word_loss

    optimizer = torch.optim.Adam(parameters, lr=lr)
    device = train_image.device
    states, targets = train.states.to(device), train.targets.to(device)
    known = torch.nonzero(train.targets != UNKNOWN).flatten()
    for _ in range(epochs):
        order = known[torch.randperm(known.numel(), generator=random)].to(device)
        for start in range(0, order.numel(), batch_size):
            batch = order[start:start + batch_size]
            loss = word_loss(logits_of(states[batch], train_image[batch]), targets[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    # The last batch's gradients would otherwise be added to the first training step's.
    optimizer.zero_grad(set_to_none=True)


@torch.no_grad()
def top1_accuracy(logits_of, words: MaskedWords, image: torch.Tensor) -> float | None:
    """Percent of the known masked words the generator's argmax restores."""
    known = words.targets != UNKNOWN
    if not known.any():
        return None
    predicted = logits_of(words.states.to(image.device), image).argmax(dim=1).cpu()
    return 100.0 * (predicted[known] == words.targets[known]).double().mean().item()
