"""The one-word-swap test: for each test caption and each kind of span it has (object, attribute, relation), the
caption with one word of one such span replaced. ``swap_acc`` is the share of (image, caption, swapped caption)
triples where the matcher scores the true caption higher (ties count as misses).

The set is fixed: the span and the replacement are drawn with a fixed seed, replacements of a kind from the
training captions' words of that kind in proportion to how often they fill such spans (natural words, frequent
ones more often), and a swap is redrawn when the generator's filter would drop it or the positive check flags it
(a copy of a caption of the image's group, a synonym or another form of the word). The replaced word of an
object span is its last (the head noun of "skin tone"). The set and its text-backbone features are cached like
the split's features.
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
from fne_fast.tags.spans import SPAN_KINDS
from fne_fast.tags.synonyms import Synonyms
from fne_fast.tags.vocab import Vocabulary

__all__ = ["SwapSet", "build_swaps", "cached_swap_set", "swap_accuracy", "SWAP_KEYS", "SWAP_SEED"]

SWAP_SEED = 20211  # fixed: every run of a data set is scored on the same swaps
_ATTEMPTS = 20  # replacements tried per (caption, kind) before giving that kind up
_SWAP_RULES_VERSION = 3
SWAP_KEYS = ("swap_acc", *(f"swap_acc_{kind}" for kind in SPAN_KINDS))


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
    for row, caption in enumerate(parsed):
        for kind_index, kind in enumerate(SPAN_KINDS):
            spans = [span for span in caption.spans if span.kind == kind]
            if not spans:
                continue
            position = spans[int(torch.randint(len(spans), (), generator=random))].positions[-1]
            weights = vocabulary.kind_counts[kind].clone()
            for _ in range(_ATTEMPTS):
                if not weights.sum() > 0:
                    break
                word_id = int(torch.multinomial(weights, 1, generator=random))
                weights[word_id] = 0.0
                replacements = {position: (vocabulary.words[word_id], vocabulary.lemmas[word_id])}
                text = caption.replaced({position: vocabulary.words[word_id]})
                if (checker.reason_to_drop(row, caption, replacements, text, set()) is None
                        and not checker.is_positive(row, caption, replacements, text)):
                    rows.append(row)
                    kinds.append(kind_index)
                    texts.append(text)
                    break
    return rows, kinds, texts


def cached_swap_set(name: str, texts, vocabulary: Vocabulary, synonyms_loader, text_encoder_loader,
                    cache_dir: str, progress: bool = True, encoder_version: str | None = None) -> SwapSet:
    """The swap set of one split (``texts``: its ``SplitTexts``), from the cache or built and encoded with the
    frozen text backbone (``text_encoder_loader()``, loaded on a miss only; ``encoder_version`` names what it
    encodes, by default the whole backbone's sentence embeddings, e.g. the trunk below ``--finetune``'s layers)."""
    key = content_fingerprint(texts.captions, texts.caption_image, texts.image_group, vocabulary.words,
                              [counts.tolist() for counts in vocabulary.kind_counts.values()], SWAP_SEED,
                              _SWAP_RULES_VERSION, [caption.to_state() for caption in texts.parsed],
                              encoder_version or text_encoder_version())
    path = os.path.join(cache_dir, "tags", f"swaps-{name}-{key}.pt")
    if os.path.exists(path):
        state = torch.load(path, weights_only=True)
        return SwapSet(state["caption"], state["kind"], list(state["texts"]), state["features"])
    rows, kinds, swapped = build_swaps(texts.parsed, texts.captions, texts.caption_image, texts.image_group,
                                       vocabulary, synonyms_loader())
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
def swap_accuracy(image: torch.Tensor, text: torch.Tensor, swapped: torch.Tensor, swap_set: SwapSet,
                  caption_image: torch.Tensor) -> dict[str, float | None]:
    """Percent of triples won by the true caption, overall and per kind; ``image`` [I, D], ``text`` [T, D] and
    ``swapped`` [S, D]: the split's embeddings and the swapped captions' (None where there is no triple)."""
    rows = swap_set.caption.to(text.device)
    anchor = image[caption_image.to(text.device)[rows]]
    won = (anchor * text[rows]).sum(dim=1) > (anchor * swapped).sum(dim=1)
    kind = swap_set.kind.to(text.device)
    result = {"swap_acc": 100.0 * won.double().mean().item() if won.numel() else None}
    for index, name in enumerate(SPAN_KINDS):
        selected = won[kind == index]
        result[f"swap_acc_{name}"] = 100.0 * selected.double().mean().item() if selected.numel() else None
    return result
