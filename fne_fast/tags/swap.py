"""The swap tests. The ``vocab`` family is the one-word-swap test: for each caption and each kind of span it has
(object, attribute, relation), the caption with one word of one such span replaced. ``swap_acc`` is the share of (image, caption, swapped caption)
triples where the matcher scores the true caption higher (ties count as misses).

The set is fixed: the span and the replacement are drawn with a fixed seed, replacements of a kind from the
training captions' words of that kind in proportion to how often they fill such spans (natural words, frequent
ones more often), and a swap is redrawn when the generator's filter would drop it or the positive check flags it
(a copy of a caption of the image's group, a synonym or another form of the word). The replaced word of an
object span is its last (the head noun of "skin tone"). The set and its text-backbone features are cached like
the split's features.

Two more families (``fne_fast.tags.heldout_swaps``) are built by rules no training component uses: ``unseen``
(replacement words outside the training captions) and ``exchange`` (two words trade places). Every family is built
for the validation split, where settings are chosen, and for the test split, which is reported.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from fne_fast.data.core import content_fingerprint
from fne_fast.data.features import stack_batches
from fne_fast.io import atomic_save
from fne_fast.models import text_encoder_version
from fne_fast.tags.filtering import CandidateFilter
from fne_fast.tags.heldout_swaps import build_exchange_swaps, build_unseen_swaps, is_negative_swap, swap_positions
from fne_fast.tags.lexicon import KIND_PART_OF_SPEECH
from fne_fast.tags.spans import SPAN_KINDS
from fne_fast.tags.synonyms import Synonyms
from fne_fast.tags.vocab import Vocabulary

__all__ = ["SwapSet", "build_swaps", "build_family", "cached_swap_set", "swap_wins", "swap_accuracy",
           "accuracy_by_kind",
           "family_suffix", "SWAP_FAMILIES", "SWAP_KEYS", "SWAP_SEED"]

SWAP_SEED = 20211  # fixed: every run of a data set is scored on the same swaps
SWAP_FAMILIES = ("vocab", "unseen", "exchange")
_ATTEMPTS = 20  # replacements tried per (caption, kind) before giving that kind up
_SWAP_RULES_VERSION = 4


def family_suffix(family: str) -> str:
    """The metric suffix of a family: none for ``vocab`` (``swap_acc``), ``_unseen``, ``_exchange``."""
    return "" if family == "vocab" else f"_{family}"


# Test split: accuracy per family (and per kind for vocab), the blind matcher's (every image replaced by the mean
# image) and the caption prior's; validation split: accuracy per family.
SWAP_KEYS = (*(f"swap_acc{family_suffix(family)}" for family in SWAP_FAMILIES),
             *(f"swap_acc_{kind}" for kind in SPAN_KINDS),
             *(f"swap_{baseline}_acc{family_suffix(family)}" for baseline in ("blind", "prior")
               for family in SWAP_FAMILIES),
             *(f"val_swap_acc{family_suffix(family)}" for family in SWAP_FAMILIES))


@dataclass
class SwapSet:
    caption: torch.Tensor  # [S] row of the swapped caption in its split
    kind: torch.Tensor  # [S] index into SPAN_KINDS
    texts: list[str]  # [S] the swapped captions
    features: torch.Tensor  # [S, D] their text-backbone features ([S, L, 385] trunk states under --finetune)

    def state_dict(self) -> dict:
        return {"caption": self.caption, "kind": self.kind, "texts": self.texts, "features": self.features}


def build_swaps(parsed, captions, caption_image, image_group, vocabulary: Vocabulary, synonyms: Synonyms,
                seed: int = SWAP_SEED) -> tuple[list[int], list[int], list[str]]:
    """(caption rows, kind indices, swapped texts) of a split's captions."""
    checker = CandidateFilter(captions, caption_image, image_group, synonyms)
    random = torch.Generator().manual_seed(seed)
    rows, kinds, texts = [], [], []
    for row, caption, kind_index, position in swap_positions(parsed, random):
        weights = vocabulary.kind_counts[SPAN_KINDS[kind_index]].clone()
        for _ in range(_ATTEMPTS):
            if not weights.sum() > 0:
                break
            word_id = int(torch.multinomial(weights, 1, generator=random))
            weights[word_id] = 0.0
            replacements = {position: (vocabulary.words[word_id], vocabulary.lemmas[word_id])}
            text = caption.replaced({position: vocabulary.words[word_id]})
            if is_negative_swap(checker, row, caption, replacements, text):
                rows.append(row)
                kinds.append(kind_index)
                texts.append(text)
                break
    return rows, kinds, texts


def build_family(family: str, texts, vocabulary: Vocabulary, synonyms: Synonyms,
                 lexicon_loader) -> tuple[list[int], list[int], list[str]]:
    """(caption rows, kind indices, swapped texts) of one family over a split's ``SplitTexts``;
    ``lexicon_loader(part_of_speech)`` gives a ``fne_fast.tags.lexicon.Lexicon`` (``unseen`` only)."""
    seed = SWAP_SEED + SWAP_FAMILIES.index(family)
    common = (texts.parsed, texts.captions, texts.caption_image, texts.image_group)
    if family == "vocab":
        return build_swaps(*common, vocabulary, synonyms, seed=seed)
    if family == "unseen":
        lexicons = {pos: lexicon_loader(pos) for pos in KIND_PART_OF_SPEECH.values()}
        return build_unseen_swaps(*common, vocabulary, synonyms, lexicons, seed)
    if family == "exchange":
        return build_exchange_swaps(*common, seed)
    raise ValueError(f"family must be one of {SWAP_FAMILIES}, got {family!r}")


def cached_swap_set(name: str, family: str, texts, vocabulary: Vocabulary, synonyms_loader, lexicon_loader,
                    text_encoder_loader, cache_dir: str, progress: bool = True,
                    encoder_version: str | None = None) -> SwapSet:
    """The swap set of one family and split (``texts``: its ``SplitTexts``), from the cache or built and encoded
    with the frozen text backbone (``text_encoder_loader()``, loaded on a miss only; ``encoder_version`` names
    what it encodes, by default the whole backbone's sentence embeddings, e.g. the trunk below ``--finetune``'s
    layers)."""
    key = content_fingerprint(texts.captions, texts.caption_image, texts.image_group, vocabulary.words,
                              [counts.tolist() for counts in vocabulary.kind_counts.values()], SWAP_SEED, family,
                              _SWAP_RULES_VERSION, [caption.to_state() for caption in texts.parsed],
                              encoder_version or text_encoder_version())
    path = os.path.join(cache_dir, "tags", f"swaps-{name}-{family}-{key}.pt")
    if os.path.exists(path):
        state = torch.load(path, weights_only=True)
        return SwapSet(state["caption"], state["kind"], list(state["texts"]), state["features"])
    rows, kinds, swapped = build_family(family, texts, vocabulary, synonyms_loader(), lexicon_loader)
    features = _encode(text_encoder_loader(), swapped, progress)
    swap_set = SwapSet(torch.tensor(rows, dtype=torch.int64), torch.tensor(kinds, dtype=torch.int64), swapped,
                       features)
    atomic_save(swap_set.state_dict(), path)
    return swap_set


def _encode(encoder, texts: list[str], progress: bool, batch_size: int = 256) -> torch.Tensor:
    from tqdm import tqdm

    chunks = [encoder.encode(texts[start:start + batch_size])
              for start in tqdm(range(0, len(texts), batch_size), desc="encoding swapped captions", unit="batch",
                                disable=not progress, leave=False)]
    return stack_batches(chunks, encoder.dim)


@torch.no_grad()
def swap_wins(image: torch.Tensor, text: torch.Tensor, swapped: torch.Tensor, swap_set: SwapSet,
              caption_image: torch.Tensor) -> torch.Tensor:
    """[S] bool: whether the true caption scores strictly higher than its swap under its image; ``image`` [I, D],
    ``text`` [T, D] and ``swapped`` [S, D]: the split's embeddings and the swapped captions'."""
    rows = swap_set.caption.to(text.device)
    anchor = image[caption_image.to(text.device)[rows]]
    return (anchor * text[rows]).sum(dim=1) > (anchor * swapped).sum(dim=1)


@torch.no_grad()
def swap_accuracy(image: torch.Tensor, text: torch.Tensor, swapped: torch.Tensor, swap_set: SwapSet,
                  caption_image: torch.Tensor) -> dict[str, float | None]:
    """Percent of triples won by the true caption, overall and per kind (``swap_wins``'s arguments; None where
    there is no triple)."""
    return accuracy_by_kind(swap_wins(image, text, swapped, swap_set, caption_image), swap_set)


def accuracy_by_kind(won: torch.Tensor, swap_set: SwapSet) -> dict[str, float | None]:
    """``swap_accuracy`` from the per-triple outcomes ``won`` [S] bool."""
    kind = swap_set.kind.to(won.device)
    result = {"swap_acc": 100.0 * won.double().mean().item() if won.numel() else None}
    for index, name in enumerate(SPAN_KINDS):
        selected = won[kind == index]
        result[f"swap_acc_{name}"] = 100.0 * selected.double().mean().item() if selected.numel() else None
    return result
