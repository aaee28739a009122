"""What a search or an annotation answers: the one set of hit types.

The service builds them (a fragment hit's attention with :func:`word_attention`); the API
returns them as they are (its response models hold these dataclasses), adding only its URLs
to a fragment hit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor


@dataclass(frozen=True)
class AttendedRegion:
    """One region of a fragment and the share of a word's attention on it (0 to 1)."""

    box: tuple[float, float, float, float]
    weight: float


@dataclass(frozen=True)
class WordAttention:
    """Which of a fragment's regions one query word attended to (weights sum to 1)."""

    word: str
    regions: list[AttendedRegion]


def word_attention(image: Tensor, texts: Tensor, tokens: Sequence[Sequence[str]],
                   region_boxes: list[tuple[float, float, float, float]],
                   lambda_softmax: float) -> list[WordAttention]:
    """Per word of each query phrase in turn, the fragment's regions by the share of its
    attention, highest first. image: (r, d) region vectors; texts: (p, w, d) the phrases' word
    vectors (zero padded), tokens: the p phrases' words."""
    from models.scan import word_region_attention

    attention = []
    for text, words in zip(texts, tokens, strict=True):
        weights = word_region_attention(image, text[: len(words)], lambda_softmax)  # (w, r)
        for word, word_weights in zip(words, weights.float().cpu().tolist(), strict=True):
            ranked = sorted(zip(region_boxes, word_weights, strict=True), key=lambda bw: -bw[1])
            # a softmax share lies in [0, 1]; clip float rounding so the API's bounds hold
            attention.append(WordAttention(word, [AttendedRegion(tuple(b), min(1.0, max(0.0, w)))
                                                  for b, w in ranked]))
    return attention


@dataclass(frozen=True)
class FragmentHit:
    fragment_id: int
    artwork_id: int
    external_id: str
    title: str
    box: tuple[float, float, float, float]
    source: str
    score: float
    width: int
    height: int
    attention: list[WordAttention]


@dataclass(frozen=True)
class ArtworkRef:
    """An artwork a phrase describes."""

    id: int
    external_id: str
    title: str


@dataclass(frozen=True)
class PhraseHit:
    phrase_id: int
    phrase: str
    score: float
    artworks: list[ArtworkRef]
