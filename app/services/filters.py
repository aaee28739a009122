"""Filters on the stored catalogue, and the facet counts that go with them.

A filter keeps the artworks whose metadata fields hold one of the given values (any of the
values of one field, every field) and whose title contains a text. It is a SQL ``WHERE``:
listing artworks runs it in the database, search turns it into the FAISS id selector of the
artworks' fragments, so a filter never shortens a list that was cut already. A metadata
value compares as text (a number 1850 matches "1850"), the same on PostgreSQL and SQLite.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from sqlalchemy import ColumnElement, Select, String, cast, func, or_, select
from sqlalchemy.orm import Session

from app.db.models import Artwork, Fragment

FACET_VALUES = 20  # values listed per facet field, most frequent first


def metadata_text(name: str) -> ColumnElement[str]:
    """The artwork's metadata field ``name`` as text (NULL where absent)."""
    return cast(Artwork.meta[name].as_string(), String)


@dataclass(frozen=True)
class ArtworkFilter:
    """Metadata field -> accepted values; a text the title contains; a text the title or the
    external id contains (both case-insensitive)."""

    fields: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    title: str | None = None
    text: str | None = None

    def __bool__(self) -> bool:
        return bool(self.fields) or bool(self.title) or bool(self.text)

    def apply(self, query: Select, *, skip: str | None = None) -> Select:
        """``query`` (which selects from artworks) narrowed by the filter; ``skip`` leaves
        one field's condition out (a facet counts its own values under the other fields)."""
        for name, values in self.fields.items():
            if name != skip:
                query = query.where(metadata_text(name).in_(values))
        if self.title:
            query = query.where(Artwork.title.icontains(self.title, autoescape=True))
        if self.text:
            query = query.where(or_(Artwork.title.icontains(self.text, autoescape=True),
                                    Artwork.external_id.icontains(self.text, autoescape=True)))
        return query


def facet_counts(session: Session, artwork_filter: ArtworkFilter, names: Sequence[str], *,
                 limit: int = FACET_VALUES) -> dict[str, list[tuple[str, int]]]:
    """Per field, its most frequent non-empty values among the artworks the filter keeps
    (the field's own condition left out, so its other values stay choosable), counted in SQL."""
    counts = {}
    for name in names:
        value = metadata_text(name)
        number = func.count(Artwork.id)
        query = (artwork_filter.apply(select(value, number), skip=name)
                 .where(value.is_not(None), value != "")
                 .group_by(value).order_by(number.desc(), value).limit(limit))
        counts[name] = [(text, count) for text, count in session.execute(query)]
    return counts


def count_artworks(session: Session, artwork_filter: ArtworkFilter) -> int:
    return session.scalar(artwork_filter.apply(select(func.count(Artwork.id)))) or 0


def fragment_ids(session: Session, artwork_filter: ArtworkFilter) -> np.ndarray:
    """(n,) int64 ids of the fragments of the artworks the filter keeps: search's FAISS selector."""
    query = artwork_filter.apply(select(Fragment.id).join(Artwork, Fragment.artwork_id == Artwork.id))
    return np.fromiter(session.scalars(query), dtype=np.int64)
