"""An epoch's synthetic sentences: mask the pool captions, refill them with the generator, filter, and encode
the survivors once with the text backbone (the expensive part, so it is done once per epoch, batched).

The pool also keeps each masked version's selected-word states, which the generator trains on (the MLM loss)
while the epoch runs; the sentences for epoch e are drawn with the generator as it was at the start of epoch e.
Under a trained text top the pool also keeps the masked versions' and the candidates' trunk states, which a step
runs the top over again (``fne_fast.tags.text_states.TrunkWords``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fne_fast.tags.filtering import DROP_REASONS, CandidateFilter
from fne_fast.tags.heads import sample_words
from fne_fast.tags.masking import MaskedVersion, mask_caption
from fne_fast.tags.spans import ParsedCaption
from fne_fast.tags.text_states import TrunkWords, WordStates
from fne_fast.tags.vocab import UNKNOWN, Vocabulary

__all__ = ["CaptionSource", "SyntheticPool", "build_pool", "random_refills", "grouped_ranges", "POOL_COUNTS"]

POOL_COUNTS = ("generated", *DROP_REASONS, "kept", "positive_generated", "positive_kept")


@dataclass
class CaptionSource:
    """The captions of one split, parsed, with their filter; ``eligible`` lists the rows that have a span."""

    parsed: list[ParsedCaption]
    filter: CandidateFilter

    def __post_init__(self):
        self.eligible = [row for row, caption in enumerate(self.parsed) if caption.spans]


@dataclass
class SyntheticPool:
    """Everything indexed by the pool position of a caption (0 … P-1) is grouped: caption p's masked words are
    rows ``masked_start[p] : + masked_count[p]``, its candidates rows ``candidate_start[p] : + candidate_count[p]``."""

    rows: torch.Tensor  # [P] split rows of the pool captions
    masked_states: torch.Tensor  # [Q, D] state of each selected word in its masked version
    masked_targets: torch.Tensor  # [Q] vocabulary id of the original word
    masked_owner: torch.Tensor  # [Q] pool position
    masked_start: torch.Tensor
    masked_count: torch.Tensor
    masked_trunk: TrunkWords | None  # under a trained top: the masked versions' trunk states, else None
    masked_version: torch.Tensor  # [Q] the masked version (row of masked_trunk) each masked word is in
    masked_position: torch.Tensor  # [Q] its word position in that version
    candidates: WordStates  # kept candidates: sentence embeddings and packed word states
    candidate_owner: torch.Tensor  # [K] pool position
    candidate_positive: torch.Tensor  # [K] bool: the broader positive check says it describes its image
    candidate_start: torch.Tensor
    candidate_count: torch.Tensor
    word_changed: torch.Tensor  # [W] bool, aligned with candidates.states
    word_original: torch.Tensor  # [W] vocabulary id of the caption's word at that position
    texts: list[str]  # [K] the candidates
    changes: list[tuple[tuple[int, str, str], ...]]  # [K] (position, original word, new word)
    counts: dict[str, int]

    def to(self, device) -> "SyntheticPool":
        moved = {name: (value.to(device) if isinstance(value, (torch.Tensor, WordStates, TrunkWords)) else value)
                 for name, value in self.__dict__.items()}
        return SyntheticPool(**moved)


def random_refills(vocabulary: Vocabulary, kinds: list[str], samples: int, random: torch.Generator) -> torch.Tensor:
    """[Q, samples] word ids, each drawn in proportion to how often the word fills a span of the masked word's kind
    in the training captions (uniformly over the known words for a kind no word fills), never the unknown word."""
    uniform = torch.ones(len(vocabulary), dtype=torch.float64)
    uniform[UNKNOWN] = 0.0
    names = list(vocabulary.kind_counts)
    weights = torch.stack([counts if counts.sum() > 0 else uniform for counts in vocabulary.kind_counts.values()])
    if not kinds:
        return torch.zeros(0, samples, dtype=torch.int64)
    rows = torch.tensor([names.index(kind) for kind in kinds])
    return torch.multinomial(weights[rows], samples, replacement=True, generator=random)


def grouped_ranges(starts: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The concatenation of arange(start, start + count) (on the inputs' device): the rows of groups."""
    total = int(counts.sum())
    first = torch.cumsum(counts, 0) - counts
    offsets = torch.arange(total, device=starts.device) - torch.repeat_interleave(first, counts)
    return torch.repeat_interleave(starts, counts) + offsets


def _grouped(owner: list[int], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    count = torch.bincount(torch.tensor(owner, dtype=torch.int64), minlength=size)
    return torch.cumsum(count, 0) - count, count


def _mask_all(source: CaptionSource, vocabulary: Vocabulary, rows: list[int], versions: int, probability: float,
              random: torch.Generator) -> list[tuple[int, MaskedVersion]]:
    return [(index, mask_caption(source.parsed[row], vocabulary, random, probability=probability))
            for index, row in enumerate(rows) for _ in range(versions)]


@torch.no_grad()
def build_pool(source: CaptionSource, vocabulary: Vocabulary, rows: list[int], image_embedding: torch.Tensor,
               generator_logits, encode, random: torch.Generator, *, masked_versions: int,
               samples: int, mask_probability: float, temperature: float, progress: bool = False) -> SyntheticPool:
    """The pool of the captions ``rows`` (each must have a span). ``image_embedding`` [P, D]: the online image
    embedding of each pool caption's image; ``generator_logits(word states, image)`` -> [Q, V] refill logits, or
    None for the ablation's refills (``random_refills``); ``encode(sentences, progress label or None)`` ->
    ``WordStates`` of (words, spaces) sentences; ``random`` draws the masks and the refills."""
    versions = _mask_all(source, vocabulary, rows, masked_versions, mask_probability, random)
    masked = encode([(version.words, source.parsed[rows[index]].spaces) for index, version in versions],
                    "encoding masked captions" if progress else None)
    state_rows = [int(masked.starts[number]) + position for number, (_, version) in enumerate(versions)
                  for position in version.positions]
    masked_version = torch.tensor([number for number, (_, version) in enumerate(versions)
                                   for _ in version.positions], dtype=torch.int64)
    masked_position = torch.tensor([position for _, version in versions for position in version.positions],
                                   dtype=torch.int64)
    masked_owner = [index for index, version in versions for _ in version.positions]
    masked_states = masked.states[state_rows]
    masked_targets = torch.tensor([vocabulary.id(source.parsed[rows[index]].words[position])
                                   for index, version in versions for position in version.positions],
                                  dtype=torch.int64)
    device = image_embedding.device
    owner_tensor = torch.tensor(masked_owner, dtype=torch.int64)
    if generator_logits is None:
        drawn = random_refills(vocabulary, [kind for _, version in versions for kind in version.kinds], samples,
                               random).tolist()
    else:
        logits = generator_logits(masked_states.to(device), image_embedding[owner_tensor.to(device)])
        drawn = sample_words(logits.cpu(), temperature, samples, random).tolist()

    counts = dict.fromkeys(POOL_COUNTS, 0)
    kept_words, kept_owner, kept_positive, texts, changes, changed_flags, originals = [], [], [], [], [], [], []
    seen: dict[int, set[tuple[str, ...]]] = {}
    cursor = 0
    for index, version in versions:
        row, caption = rows[index], source.parsed[rows[index]]
        selected = range(cursor, cursor + len(version.positions))
        cursor += len(version.positions)
        for sample in range(samples):
            replacements = {}
            for position, selected_row in zip(version.positions, selected):
                word_id = drawn[selected_row][sample]
                if vocabulary.words[word_id] != caption.words[position].lower():
                    replacements[position] = (vocabulary.words[word_id], vocabulary.lemmas[word_id])
            words = caption.replaced_words({position: word for position, (word, _) in replacements.items()})
            text = "".join(word + space for word, space in zip(words, caption.spaces))
            positive = source.filter.is_positive(row, caption, replacements, text)
            reason = source.filter.reason_to_drop(row, caption, replacements, text, seen.setdefault(index, set()))
            counts["generated"] += 1
            counts["positive_generated"] += positive
            if reason is not None:
                counts[reason] += 1
                continue
            counts["kept"] += 1
            counts["positive_kept"] += positive
            kept_words.append((words, caption.spaces))
            kept_owner.append(index)
            kept_positive.append(positive)
            texts.append(text)
            changes.append(tuple((position, caption.words[position], words[position])
                                 for position in sorted(replacements)))
            changed_flags += [position in replacements for position in range(len(words))]
            originals += [vocabulary.id(word) for word in caption.words]

    candidates = encode(kept_words, "encoding synthetic sentences" if progress else None)
    masked_start, masked_count = _grouped(masked_owner, len(rows))
    candidate_start, candidate_count = _grouped(kept_owner, len(rows))
    return SyntheticPool(torch.tensor(rows, dtype=torch.int64), masked_states, masked_targets, owner_tensor,
                         masked_start, masked_count, masked.trunk, masked_version, masked_position, candidates,
                         torch.tensor(kept_owner, dtype=torch.int64),
                         torch.tensor(kept_positive, dtype=torch.bool), candidate_start, candidate_count,
                         torch.tensor(changed_flags, dtype=torch.bool), torch.tensor(originals, dtype=torch.int64),
                         texts, changes, counts)
