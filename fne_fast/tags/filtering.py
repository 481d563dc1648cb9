"""Which refilled sentences are kept as negatives, and which may really be positives.

A candidate is dropped when it is a *copy* (made only of words of its image's captions or, where the data has
semantic groups, of its group's captions: a caption up to case, punctuation and word order, since CLDR keyword
lists are unordered; a keyword repeated, "face, face, grinning face" for "face, grin, grinning face", the
generator's favourite once it has learnt the captions; or a variant's caption, "thumbs up: dark skin tone" for
the medium-skin-tone image), a *duplicate* of an earlier candidate of the same caption, or a *synonym* swap
(every changed word is another form or a WordNet synonym of the word it replaced).

The positive check the trainer reports is broader than the filter: it also flags a candidate each of whose
changed words is a group-caption word or another form or a WordNet synonym of one (a synonym put in another
place). Some of those are real negatives, so the share it reports is an upper bound.
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
        self.group_words: dict[int, set[str]] = {}
        for caption, group in zip(captions, self.caption_group):
            self.group_words.setdefault(group, set()).update(normalise(caption).split())

    def _only_same_meaning(self, caption: ParsedCaption, replacements: dict[int, tuple[str, str]]) -> bool:
        return all(self.synonyms.same_meaning(caption.words[position], caption.lemmas[position], word, lemma)
                   for position, (word, lemma) in replacements.items())

    def reason_to_drop(self, caption_index: int, caption: ParsedCaption, replacements: dict[int, tuple[str, str]],
                       text: str, seen: set[tuple[str, ...]]) -> str | None:
        """One of DROP_REASONS, or None to keep. ``replacements``: position -> (new word, its lemma); ``seen``:
        the candidates of the caption kept so far, as word bags (this call adds the candidate's)."""
        bag = _bag(text)
        if set(bag) <= self.group_words[self.caption_group[caption_index]]:
            return "copy"
        if bag in seen:
            return "duplicate"
        if self._only_same_meaning(caption, replacements):
            return "synonym"
        seen.add(bag)
        return None

    def is_positive(self, caption_index: int, caption: ParsedCaption, replacements: dict[int, tuple[str, str]],
                    text: str) -> bool:
        """Whether the candidate may describe its image: each changed word is a word of the group's captions, or
        another form or a WordNet synonym of one (copies and synonym swaps included)."""
        group_words = self.group_words[self.caption_group[caption_index]]
        return all(normalise(word) in group_words
                   or any(self.synonyms.same_meaning(word, lemma, other, other) for other in group_words)
                   for word, lemma in replacements.values())
