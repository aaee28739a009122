"""What a visitor's query asks for: the noun phrases it names, scored one by one.

"blue fish on a red cup" names two things; SCAN was trained on one noun phrase per fragment,
so the query is split into its noun phrases (:func:`collection.phrases.extract_phrases`:
spaCy noun chunks plus the POS-pattern fallback) and each phrase is scored against a
fragment on its own. A fragment's score is the **mean** of its phrases' scores: every thing
the query names counts equally, so a fragment that shows all of them ranks above one that
shows only one. A query that names no noun phrase ("very old", "the of") is scored whole,
as one text: the fallback.
"""

from __future__ import annotations

from dataclasses import dataclass

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
