"""Which refilled sentences are kept as negatives, and which would really be positives.

A candidate is dropped when it is a *copy* (equal, after normalising case and punctuation, to a caption of its
image or, where the data has semantic groups, of any image of the group), a *duplicate* of an earlier candidate
of the same caption, or a *synonym* swap (every changed word is another form or a WordNet synonym of the word it
replaced). The positive check the trainer reports is broader than the filter: it also counts a candidate whose
words are, in any order, those of a group caption (CLDR keyword lists are unordered).
"""

from __future__ import annotations

import re

from fne_fast.tags.spans import ParsedCaption
from fne_fast.tags.synonyms import Synonyms

__all__ = ["normalise", "CandidateFilter", "DROP_REASONS"]

DROP_REASONS = ("copy", "duplicate", "synonym")
_NOT_WORD = re.compile(r"[^0-9a-z]+")


def normalise(text: str) -> str:
    return _NOT_WORD.sub(" ", text.lower()).strip()


def _bag(text: str) -> tuple[str, ...]:
    return tuple(sorted(normalise(text).split()))


class CandidateFilter:
    """The filter for the captions of one split. ``image_group`` [I] (or None) gives each image's group."""

    def __init__(self, captions: list[str], caption_image: list[int], image_group: list[int] | None,
                 synonyms: Synonyms):
        self.synonyms = synonyms
        self.caption_group = [image if image_group is None else int(image_group[image]) for image in caption_image]
        self.group_texts: dict[int, set[str]] = {}
        self.group_bags: dict[int, set[tuple[str, ...]]] = {}
        for caption, group in zip(captions, self.caption_group):
            self.group_texts.setdefault(group, set()).add(normalise(caption))
            self.group_bags.setdefault(group, set()).add(_bag(caption))

    def _only_same_meaning(self, caption: ParsedCaption, replacements: dict[int, tuple[str, str]]) -> bool:
        return all(self.synonyms.same_meaning(caption.words[position], caption.lemmas[position], word, lemma)
                   for position, (word, lemma) in replacements.items())

    def reason_to_drop(self, caption_index: int, caption: ParsedCaption, replacements: dict[int, tuple[str, str]],
                       text: str, seen: set[str]) -> str | None:
        """One of DROP_REASONS, or None to keep. ``replacements``: position -> (new word, its lemma); ``seen``:
        the normalised texts of the caption's candidates kept so far (this call adds the candidate's)."""
        normalised = normalise(text)
        if normalised in self.group_texts[self.caption_group[caption_index]]:
            return "copy"
        if normalised in seen:
            return "duplicate"
        if self._only_same_meaning(caption, replacements):
            return "synonym"
        seen.add(normalised)
        return None

    def is_positive(self, caption_index: int, caption: ParsedCaption, replacements: dict[int, tuple[str, str]],
                    text: str) -> bool:
        """Whether the candidate really describes its image: a group caption up to word order, or only
        synonym / inflection changes."""
        group = self.caption_group[caption_index]
        return (normalise(text) in self.group_texts[group] or _bag(text) in self.group_bags[group]
                or self._only_same_meaning(caption, replacements))
