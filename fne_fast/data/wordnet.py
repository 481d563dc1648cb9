"""WordNet (Debian wordnet-base): lemma ↔ gloss pairs, ~207k of them. The "image" side is the lemma text (both
sides go through the text encoder); the synset is the semantic group, so the synonyms of a lemma, which share its
gloss, are its natural false negatives. Splits are drawn by synset."""

from __future__ import annotations

import os

from fne_fast.data.core import DatasetFormatError, RawSplit, content_fingerprint, hash_split

__all__ = ["load_wordnet", "parse_data_line", "data_entries", "DEFAULT_ROOT", "DATA_FILES"]

DEFAULT_ROOT = "/usr/share/wordnet"
DATA_FILES = ("data.noun", "data.verb", "data.adj", "data.adv")


def parse_data_line(line: str, path: str, line_number: int) -> tuple[str, list[str], str]:
    """(synset key, lemmas, definition) of one line of a WordNet data file (wndb(5WN) format)."""
    fields, separator, gloss = line.partition(" | ")
    if not separator:
        raise DatasetFormatError(path, "no ' | ' before the gloss", line_number)
    tokens = fields.split()
    try:
        offset, _, synset_type, word_count = tokens[0], tokens[1], tokens[2], int(tokens[3], 16)
    except (IndexError, ValueError) as error:
        raise DatasetFormatError(path, "expected 'offset lex_filenum ss_type w_cnt(hex)' at the start",
                                 line_number) from error
    words = tokens[4:4 + 2 * word_count:2]
    if word_count < 1 or len(words) != word_count:
        raise DatasetFormatError(path, f"w_cnt says {word_count} words, the line holds {len(words)}", line_number)
    # Adjective markers such as "(a)" or "(p)" are syntax, not part of the lemma.
    lemmas = [word.split("(")[0].replace("_", " ") for word in words]
    definition = gloss.split('; "')[0].strip()  # the definition, without the quoted examples
    if not definition:
        raise DatasetFormatError(path, "empty gloss", line_number)
    return f"{synset_type}{offset}", lemmas, definition


def data_entries(root: str, missing_hint: str):
    """(file number, synset key, lemmas, definition) of every synset line of the four data files, in file order;
    a missing file is a DatasetFormatError naming it, with ``missing_hint`` as the advice."""
    for file_number, file_name in enumerate(DATA_FILES):
        path = os.path.join(root, file_name)
        if not os.path.isfile(path):
            raise DatasetFormatError(path, f"WordNet data file not found ({missing_hint})")
        with open(path, encoding="utf-8", errors="replace") as stream:
            for line_number, line in enumerate(stream, start=1):
                if line.startswith("  ") or not line.strip():
                    continue  # the licence header is indented by two spaces
                yield (file_number, *parse_data_line(line.rstrip("\n"), path, line_number))


def load_wordnet(split: str, *, root: str = DEFAULT_ROOT, limit: int | None = None) -> RawSplit:
    """All (lemma, definition) pairs of the synsets in one split; ``limit`` keeps the first pairs."""
    lemmas_out, captions, groups = [], [], []
    hint = "install Debian's wordnet-base, e.g. with scripts/setup_data.sh, or pass --data-root"
    for _, synset, lemmas, definition in data_entries(root, hint):
        if hash_split(synset) != split:
            continue
        lemmas_out.extend(lemmas)
        captions.extend([definition] * len(lemmas))
        groups.extend([synset] * len(lemmas))
        if limit is not None and len(lemmas_out) >= limit:
            break
    if limit is not None:
        lemmas_out, captions, groups = lemmas_out[:limit], captions[:limit], groups[:limit]
    fingerprint = content_fingerprint("wordnet", limit, len(lemmas_out))
    return RawSplit("wordnet", split, lemmas_out, captions, list(range(len(lemmas_out))), groups, fingerprint,
                    image_modality="text", image_names=lemmas_out,
                    sources={"data_files": [os.path.join(root, name) for name in DATA_FILES]})
