"""What a TAGS-DC run shows of itself: the word-level accuracies of its heads on held-out synthetic sentences,
and ``examples.md`` (each epoch, a few captions and their synthetic sentences with the changed words marked)."""

from __future__ import annotations

import re

import torch

from fne_fast.tags.heads import TagsHeads
from fne_fast.tags.pool import SyntheticPool
from fne_fast.tags.vocab import UNKNOWN

__all__ = ["word_level_metrics", "examples_section", "export_records", "EXAMPLES_NAME"]

EXAMPLES_NAME = "examples.md"
# Characters that would start emphasis, code, links, tables or HTML inside a list item.
_MARKDOWN = re.compile(r"([\\`*_\[\]<>|~])")


@torch.no_grad()
def word_level_metrics(heads: TagsHeads, pool: SyntheticPool, image_embedding: torch.Tensor,
                       word_table: torch.Tensor | None = None) -> dict[str, float]:
    """Percent: discrimination accuracy over all words of the pool's sentences and F1 of the "changed" class,
    correction top-1 over the changed words (an original outside the vocabulary counts as a miss), and the
    generator's top-1 on the masked words. ``image_embedding`` [P, D]: the image of each pool caption;
    ``word_table``: the tied heads' (``TagsHeads.word_logits``)."""
    states, lengths = pool.candidates.states, pool.candidates.lengths
    word_owner = torch.repeat_interleave(pool.candidate_owner, lengths)
    predicted = heads.discriminator(states, image_embedding[word_owner]).argmax(dim=1).bool()
    changed = pool.word_changed
    true_positive = (predicted & changed).sum().item()
    precision_base, recall_base = predicted.sum().item(), changed.sum().item()
    f1 = 2 * true_positive / (precision_base + recall_base) if precision_base + recall_base else 0.0
    corrected = heads.word_logits(heads.corrector, states[changed], image_embedding[word_owner[changed]],
                                  word_table).argmax(dim=1)
    original = pool.word_original[changed]
    correction_hits = ((corrected == original) & (original != UNKNOWN)).sum().item()
    generated = heads.word_logits(heads.generator, pool.masked_states, image_embedding[pool.masked_owner],
                                  word_table).argmax(dim=1)
    words, masked = changed.numel(), pool.masked_targets.numel()
    return {"heldout_discrimination_acc": 100.0 * (predicted == changed).sum().item() / words if words else None,
            "heldout_discrimination_f1": 100.0 * f1 if words else None,
            "heldout_correction_top1": 100.0 * correction_hits / recall_base if recall_base else None,
            "heldout_generator_top1": (100.0 * (generated == pool.masked_targets).sum().item() / masked
                                       if masked else None)}


def _escape(text: str) -> str:
    return _MARKDOWN.sub(r"\\\1", text)


def _marked(text_words: list[str], spaces: tuple[str, ...], changes) -> str:
    """The sentence with each changed word in bold, followed by the word it replaced."""
    words = [_escape(word) for word in text_words]
    for position, original, new in changes:
        words[position] = f"**{_escape(new)}** (~~{_escape(original)}~~)"
    return "".join(word + space for word, space in zip(words, spaces))


def _ranked(pool: SyntheticPool, scores: torch.Tensor, position: int) -> list[int]:
    """The candidates of pool caption ``position``, hardest (highest score) first."""
    start, number = int(pool.candidate_start[position]), int(pool.candidate_count[position])
    return sorted(range(start, start + number), key=lambda candidate: -float(scores[candidate]))


def examples_section(epoch: int, pool: SyntheticPool, scores: torch.Tensor, parsed, captions: list[str],
                     image_names: list[str], caption_image: list[int], count: int, per_caption: int) -> str:
    """Markdown for one epoch: the first ``count`` pool captions, each with its ``per_caption`` hardest synthetic
    sentences (highest score ``scores`` [K] under the model at the end of the epoch)."""
    lines = [f"## Epoch {epoch}", ""]
    shown = 0
    for position in range(pool.rows.numel()):
        if shown == count:
            break
        ranked = _ranked(pool, scores, position)
        if not ranked:
            continue
        row = int(pool.rows[position])
        name = image_names[caption_image[row]] if image_names else str(caption_image[row])
        lines.append(f"- {_escape(captions[row])} (image {_escape(name)})")
        for candidate in ranked[:per_caption]:
            lines.append(f"  - {_marked(list(parsed[row].words), parsed[row].spaces, pool.changes[candidate])} "
                         f"(score {float(scores[candidate]):.3f})")
        shown += 1
    return "\n".join(lines) + "\n"


def export_records(epoch: int, pool: SyntheticPool, scores: torch.Tensor, caption_scores: torch.Tensor, parsed,
                   captions: list[str], image_names: list[str], caption_image: list[int]) -> list[dict]:
    """One JSON-ready record per kept synthetic sentence of the epoch's pool: its caption (training row, text,
    image, spans), the sentence, its changed words, and the matcher's scores at the end of the epoch (of the
    sentence and of the caption, ``scores`` [K] and ``caption_scores`` [P]) with the sentence's rank among its
    caption's (0: the hardest)."""
    records = []
    for position in range(pool.rows.numel()):
        ranked = _ranked(pool, scores, position)
        rank_of = {candidate: rank for rank, candidate in enumerate(ranked)}
        row = int(pool.rows[position])
        caption = parsed[row]
        spans = [{"kind": span.kind, "positions": list(span.positions),
                  "words": [caption.words[index] for index in span.positions]} for span in caption.spans]
        for candidate in sorted(ranked):
            records.append({
                "epoch": epoch, "row": row, "caption": captions[row],
                "image": image_names[caption_image[row]] if image_names else caption_image[row],
                "sentence": pool.texts[candidate],
                "changes": [{"position": index, "original": original, "new": new}
                            for index, original, new in pool.changes[candidate]],
                "spans": spans, "score": float(scores[candidate]), "caption_score": float(caption_scores[position]),
                "rank": rank_of[candidate], "possible_positive": bool(pool.candidate_positive[candidate])})
    return records
