"""WordNet synonymy (Debian wordnet-base) for the filter: a candidate whose only changes are synonyms of the
original words ("car" -> "automobile") or other forms of them ("face" -> "faces") describes the same image, so it
is not a negative. Two words are synonyms when they share a synset; words are looked up as written and as their
lemma (WordNet lists base forms)."""

from __future__ import annotations

from functools import lru_cache

from fne_fast.data.wordnet import DATA_FILES, DEFAULT_ROOT, data_entries

__all__ = ["Synonyms", "load_synonyms"]

class Synonyms:
    """``synsets[lemma]``: the synsets (as small integers) a lower-cased lemma belongs to."""

    def __init__(self, synsets: dict[str, frozenset[int]]):
        self.synsets = synsets

    def _synsets_of(self, word: str, lemma: str) -> frozenset[int]:
        return self.synsets.get(word, frozenset()) | self.synsets.get(lemma, frozenset())

    def same_meaning(self, word: str, lemma: str, other_word: str, other_lemma: str) -> bool:
        """Whether replacing (word, lemma) by (other_word, other_lemma) keeps the meaning: the same word, another
        form of it (same lemma), or a WordNet synonym."""
        word, other_word = word.lower(), other_word.lower()
        if word == other_word or lemma == other_lemma:
            return True
        return not self._synsets_of(word, lemma).isdisjoint(self._synsets_of(other_word, other_lemma))


@lru_cache(maxsize=2)
def load_synonyms(root: str = DEFAULT_ROOT) -> Synonyms:
    """The lemma -> synsets map of every WordNet data file (about 2 s; cached per process)."""
    synsets: dict[str, set[int]] = {}
    hint = "install Debian's wordnet-base, e.g. with scripts/setup_data.sh: TAGS-DC filters synonym swaps with it"
    for file_number, synset, lemmas, _ in data_entries(root, hint):
        # The byte offset is unique within a file; the file number makes it unique across the four.
        synset_id = int(synset[1:]) * len(DATA_FILES) + file_number
        for lemma in lemmas:
            synsets.setdefault(lemma.lower(), set()).add(synset_id)
    return Synonyms({lemma: frozenset(ids) for lemma, ids in synsets.items()})
