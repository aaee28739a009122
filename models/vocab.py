"""Word tokens and the vocabulary that maps them to ids.

Both sides of the system tokenise text with :func:`tokenize`, so a phrase typed into the
search box becomes the same ids as the phrase the model was trained on.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from index.atomic import write_json_atomic

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)
PAD_ID, START_ID, END_ID, UNK_ID = range(4)

_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def tokenize(text: str) -> list[str]:
    """Lower-case word tokens: letters and digits, with an inner apostrophe kept ("king's")."""
    return _TOKEN.findall(text.lower())


class Vocabulary:
    """An ordered list of tokens; ids are positions. The four specials always come first."""

    def __init__(self, tokens: Iterable[str]):
        tokens = list(tokens)
        if tuple(tokens[:4]) != SPECIALS:
            raise ValueError(f"a vocabulary must start with {SPECIALS}, got {tokens[:4]}")
        if len(set(tokens)) != len(tokens):
            raise ValueError("a vocabulary must not repeat a token")
        self.tokens = tokens
        self.index = {token: i for i, token in enumerate(tokens)}

    @classmethod
    def build(cls, token_lists: Iterable[Iterable[str]], min_count: int = 1) -> Vocabulary:
        """Every token seen at least ``min_count`` times, most frequent first (ties by name)."""
        counts = Counter(token for tokens in token_lists for token in tokens)
        kept = sorted((t for t, c in counts.items() if c >= min_count and t not in SPECIALS),
                      key=lambda t: (-counts[t], t))
        return cls([*SPECIALS, *kept])

    def __len__(self) -> int:
        return len(self.tokens)

    def __contains__(self, token: str) -> bool:
        return token in self.index

    def encode(self, tokens: Iterable[str]) -> list[int]:
        """Ids of ``tokens``; unknown tokens become ``<unk>``. No start/end markers are added."""
        return [self.index.get(token, UNK_ID) for token in tokens]

    def decode(self, ids: Iterable[int]) -> list[str]:
        return [self.tokens[i] for i in ids]

    def to_json(self) -> list[str]:
        return list(self.tokens)

    def save(self, path: str | Path) -> None:
        write_json_atomic(path, self.tokens, indent=0)

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        try:
            tokens = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: not a vocabulary file ({exc})") from exc
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            raise ValueError(f"{path}: a vocabulary file must hold a JSON list of strings")
        return cls(tokens)
