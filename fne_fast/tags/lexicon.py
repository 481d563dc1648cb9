"""WordNet's words of one part of speech and how they relate, for swaps no training component makes: the
replacement of a word by a *sibling* (a noun or verb under the same hypernym, "dog" -> "wolf"; an adjective in the
same similar-to cluster or its antonym's, "big" -> "tiny"), and how often each lemma is sense-tagged (SemCor's
counts in the index files), which weighs a fallback draw toward common words."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import lru_cache

from fne_fast.data.wordnet import DEFAULT_ROOT
from fne_fast.data.core import DatasetFormatError

__all__ = ["Lexicon", "load_lexicon", "inflect_like", "KIND_PART_OF_SPEECH"]

# The part of speech a span kind's words take in WordNet (relations: verbs; prepositions are not in WordNet).
KIND_PART_OF_SPEECH = {"object": "noun", "attribute": "adj", "relation": "verb"}
# Pointers followed to find siblings: up then down for nouns and verbs, similar-to and antonym for adjectives.
_UP, _DOWN = ("@", "@i"), ("~", "~i")
_ADJECTIVE_LINKS = ("&", "!")
_POS_LETTERS = {"noun": ("n",), "verb": ("v",), "adj": ("a", "s")}
_WORD = re.compile(r"^[a-z]{3,}$")


@dataclass
class Lexicon:
    part_of_speech: str
    synsets: dict[str, list[int]]  # lemma -> its synsets (offsets), most frequent sense first
    members: dict[int, list[str]]  # synset -> its single-word lower-case lemmas
    links: dict[int, list[tuple[str, int]]]  # synset -> (pointer symbol, synset) within this part of speech
    tagged: dict[str, int]  # lemma -> sense-tagged occurrences (0 for most)

    def siblings(self, lemma: str, senses: int = 2) -> list[str]:
        """The single-word lemmas related to ``lemma``'s first ``senses`` synsets, in a fixed order, without the
        lemma's own synsets' members."""
        own = self.synsets.get(lemma, [])[:senses]
        found: dict[str, None] = {}
        for synset in own:
            if self.part_of_speech == "adj":
                near = [target for symbol, target in self.links.get(synset, []) if symbol in _ADJECTIVE_LINKS]
                near += [second for target in near for symbol, second in self.links.get(target, [])
                         if symbol == "&"]
            else:
                near = [child for symbol, parent in self.links.get(synset, []) if symbol in _UP
                        for down, child in self.links.get(parent, []) if down in _DOWN]
            for target in near:
                for word in self.members.get(target, []):
                    found.setdefault(word)
        excluded = {word for synset in self.synsets.get(lemma, []) for word in self.members.get(synset, [])}
        return [word for word in found if word not in excluded and word != lemma]


def _read(path: str):
    if not os.path.isfile(path):
        raise DatasetFormatError(path, "WordNet file not found (install Debian's wordnet-base, e.g. with "
                                       "scripts/setup_data.sh)")
    with open(path, encoding="utf-8", errors="replace") as stream:
        for line_number, line in enumerate(stream, start=1):
            if not line.startswith("  ") and line.strip():
                yield line_number, line.split(" | ")[0].split()


@lru_cache(maxsize=3)
def load_lexicon(part_of_speech: str, root: str = DEFAULT_ROOT) -> Lexicon:
    """The lexicon of ``part_of_speech`` ("noun", "verb" or "adj"), read once per process (about a second)."""
    if part_of_speech not in _POS_LETTERS:
        raise ValueError(f"part_of_speech must be one of {tuple(_POS_LETTERS)}, got {part_of_speech!r}")
    letters = _POS_LETTERS[part_of_speech]
    members, links = {}, {}
    data = os.path.join(root, f"data.{part_of_speech}")
    for line_number, tokens in _read(data):
        try:
            offset, count = int(tokens[0]), int(tokens[3], 16)
            words = [word.split("(")[0].lower() for word in tokens[4:4 + 2 * count:2]]
            pointer_count = int(tokens[4 + 2 * count])
            pointers = tokens[5 + 2 * count:5 + 2 * count + 4 * pointer_count]
        except (IndexError, ValueError) as error:
            raise DatasetFormatError(data, "not a WordNet data line", line_number) from error
        members[offset] = [word for word in words if _WORD.match(word)]
        links[offset] = [(pointers[at], int(pointers[at + 1])) for at in range(0, len(pointers), 4)
                         if pointers[at + 2] in letters]
    synsets, tagged = {}, {}
    index = os.path.join(root, f"index.{part_of_speech}")
    for line_number, tokens in _read(index):
        try:
            pointer_count = int(tokens[3])
            tagged[tokens[0]] = int(tokens[5 + pointer_count])
            synsets[tokens[0]] = [int(offset) for offset in tokens[6 + pointer_count:]]
        except (IndexError, ValueError) as error:
            raise DatasetFormatError(index, "not a WordNet index line", line_number) from error
    return Lexicon(part_of_speech, synsets, members, links, tagged)


def _ends_in_consonant_y(word: str) -> bool:
    return len(word) > 1 and word.endswith("y") and word[-2] not in "aeiou"


def inflect_like(original: str, lemma: str, replacement: str) -> str:
    """``replacement`` (a base form) in the form ``original`` takes against its ``lemma``: -ing, -ed or -s, by
    spelling rules that are right for most regular words."""
    original, lemma = original.lower(), lemma.lower()
    if original == lemma:
        return replacement
    if original.endswith("ing"):
        if replacement.endswith("ie"):
            return replacement[:-2] + "ying"
        if replacement.endswith("e") and not replacement.endswith("ee"):
            return replacement[:-1] + "ing"
        return replacement + "ing"
    if original.endswith("ed"):
        if replacement.endswith("e"):
            return replacement + "d"
        return (replacement[:-1] + "ied") if _ends_in_consonant_y(replacement) else replacement + "ed"
    if original.endswith("s"):
        if replacement.endswith(("s", "x", "z", "ch", "sh")):
            return replacement + "es"
        return (replacement[:-1] + "ies") if _ends_in_consonant_y(replacement) else replacement + "s"
    return replacement
