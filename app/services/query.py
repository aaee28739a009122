"""What a visitor's query asks for: the noun phrases it names, scored one by one.

"blue fish on a red cup" names two things; SCAN was trained on one noun phrase per fragment,
so the query is split into its noun phrases (:func:`collection.phrases.extract_phrases`:
spaCy noun chunks plus the POS-pattern fallback) and each phrase is scored against a
fragment on its own. A fragment's score is the **mean of its best phrase score and the mean
of all its phrase scores** (:func:`combine`): the thing it shows best counts most, so a
fragment that shows one of the named things well ranks above one that half-matches them all
(a phrase the model cannot ground only dilutes), and among fragments that show one thing,
those that also show the others rank first. With one phrase it is that phrase's score. A
query that names no noun phrase ("very old", "the of") is scored whole, as one text: the
fallback.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from collection.phrases import extract_phrases, normalise_phrase
from models.text import TextReader
from models.vocab import tokenize

MAX_PHRASES = 8  # phrases of one query that are scored; the rest are dropped


@dataclass(frozen=True)
class ParsedQuery:
    query: str
    phrases: list[str]  # what is scored: the noun phrases, or the whole query (whole=True)
    tokens: list[list[str]]  # the words of each phrase as the text encoder reads them
    whole: bool  # no noun phrase was found: the whole query is one text
    unknown_words: list[str]  # query words the model cannot use (outside a GRU's vocabulary)


def parse_query(query: str, reader: TextReader) -> ParsedQuery:
    """Split ``query`` into the phrases to score; a ValueError if it has no words at all."""
    words = tokenize(query)
    if not words:
        raise ValueError(f"query {query!r} has no words to search for")
    phrases = [p for p in extract_phrases(query) if reader.tokens(p)][:MAX_PHRASES]
    whole = not phrases
    if whole:
        phrases = [normalise_phrase(query)]
    tokens = [reader.tokens(p) or reader.tokens(query) for p in phrases]
    return ParsedQuery(query, phrases, tokens, whole, reader.unknown_words(words))


def combine(per_phrase: Tensor) -> Tensor:
    """(n, p) scores of n fragments against a query's p phrases -> (n,): the mean of each
    fragment's best phrase score and its mean phrase score."""
    return (per_phrase.amax(dim=1) + per_phrase.mean(dim=1)) / 2
