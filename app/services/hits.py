"""What a search or an annotation answers: the one set of hit types.

The service builds them; the API returns them as they are (its response models hold these
dataclasses), adding only its URLs to a fragment hit.
"""

from __future__ import annotations

from dataclasses import dataclass, field


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


@dataclass(frozen=True)
class AttributeScore:
    """A word the detector's attribute head predicts for a fragment's box (probability 0 to 1)."""

    word: str
    score: float


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
    also: list[int] = field(default_factory=list)  # fragment ids folded into this one
    attributes: list[AttributeScore] = field(default_factory=list)


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
