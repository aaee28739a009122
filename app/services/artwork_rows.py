"""Every database row of one artwork, written inside the caller's transaction (nothing is
committed here), and the index change it makes."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from app.db.models import Annotation, Artwork, ArtworkPhrase, Caption, Fragment, Phrase, Region
from app.services.changes import IndexChange
from index.fragments import fragments_of


@dataclass(frozen=True)
class AnnotationIn:
    """A validated annotation: a normalised phrase and its box on the image."""

    phrase: str
    box: tuple[float, float, float, float]


@dataclass(frozen=True)
class ArtworkContent:
    """An artwork's validated content: what its rows hold, and what its content hash covers."""

    external_id: str
    title: str
    metadata: dict[str, Any]
    captions: list[str]
    notes: list[AnnotationIn]
    split: str | None
    phrases: Sequence[str] | None  # None: extracted from the captions at ingest
    image_sha256: str
    width: int
    height: int

    def sha256(self) -> str:
        """The hash that tells an unchanged re-upload from new content."""
        content = {
            "image": self.image_sha256, "title": self.title, "metadata": self.metadata,
            "captions": self.captions, "annotations": [[n.phrase, list(n.box)] for n in self.notes],
            "split": self.split, "phrases": list(self.phrases) if self.phrases is not None else None,
        }
        encoded = json.dumps(content, sort_keys=True, ensure_ascii=False, default=str)
        return hashlib.sha256(encoded.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class StoredRegions:
    """An artwork's regions: global feature-store rows and their boxes, scores and kinds."""

    rows: np.ndarray  # (n,) int64
    boxes: np.ndarray  # (n, 4) float32 xyxy, original pixels
    scores: np.ndarray  # (n,)
    kinds: np.ndarray  # (n,) int8


def write_rows(session: Session, *, existing: Artwork | None, content: ArtworkContent,
               phrases: Sequence[str], image_location: str, regions: StoredRegions,
               change: IndexChange) -> Artwork:
    """Create ``content``'s artwork, or rewrite ``existing`` (it keeps its id), with every
    row it owns; fills ``change`` with the fragments and phrases added and dropped."""
    artwork, old_phrase_ids = _artwork_row(session, existing, content, image_location, change)
    session.add_all(Caption(artwork_id=artwork.id, position=i, text=text)
                    for i, text in enumerate(content.captions))
    texts = list(dict.fromkeys([*phrases, *(n.phrase for n in content.notes)]))
    phrase_rows, created = get_or_create_phrases(session, texts)
    session.add_all(ArtworkPhrase(artwork_id=artwork.id, phrase_id=phrase_rows[t].id) for t in texts)
    session.add_all(
        Annotation(artwork_id=artwork.id, phrase_id=phrase_rows[n.phrase].id, x1=n.box[0],
                   y1=n.box[1], x2=n.box[2], y2=n.box[3], source="ground_truth")
        for n in content.notes
    )
    change.added_fragments = _region_rows(session, artwork, regions)
    change.added_phrases = [phrase_rows[t].id for t in created]
    kept = {phrase_rows[t].id for t in texts}
    change.removed_phrases = drop_orphan_phrases(
        session, [p for p in old_phrase_ids if p not in kept]
    )
    session.refresh(artwork, ["phrase_links"])
    return artwork


def _artwork_row(session: Session, existing: Artwork | None, content: ArtworkContent,
                 image_location: str, change: IndexChange) -> tuple[Artwork, list[int]]:
    """The artwork's own row, emptied of what it owned when it is replaced; returns it and
    the ids of the phrases it was linked to."""
    old_phrase_ids: list[int] = []
    if existing is None:
        artwork = Artwork(external_id=content.external_id)
        session.add(artwork)
    else:
        artwork = existing
        change.removed_fragments = [f.id for f in artwork.fragments]
        old_phrase_ids = [link.phrase_id for link in artwork.phrase_links]
        # Replacing: the artwork keeps its id; everything it owns is written anew.
        delete_owned_rows(session, artwork)
    artwork.title = content.title
    artwork.meta = content.metadata
    artwork.split = content.split
    artwork.image_location = image_location
    artwork.image_sha256 = content.image_sha256
    artwork.content_sha256 = content.sha256()
    artwork.width, artwork.height = content.width, content.height
    session.flush()
    return artwork, old_phrase_ids


OWNED = (Caption, Region, Fragment, Annotation, ArtworkPhrase)  # the tables keyed by artwork_id


def delete_owned_rows(session: Session, artwork: Artwork) -> None:
    """Delete every row ``artwork`` owns with one statement per table, whatever it holds
    (the ORM's cascade would load each collection and delete row by row: 37 regions and 37
    fragments are 74 statements), and forget the collections it had loaded."""
    for owned in OWNED:
        session.execute(delete(owned).where(owned.artwork_id == artwork.id))
    session.expire(artwork, ["captions", "regions", "fragments", "annotations", "phrase_links"])


def _region_rows(session: Session, artwork: Artwork, regions: StoredRegions) -> list[int]:
    """The artwork's region and fragment rows; returns the new fragments' ids."""
    session.add_all(
        Region(artwork_id=artwork.id, store_row=int(row), x1=float(b[0]), y1=float(b[1]),
               x2=float(b[2]), y2=float(b[3]), score=float(s), kind=int(k))
        for row, b, s, k in zip(regions.rows, regions.boxes, regions.scores, regions.kinds,
                                strict=True)
    )
    fragments = [
        Fragment(artwork_id=artwork.id, x1=float(spec.box[0]), y1=float(spec.box[1]),
                 x2=float(spec.box[2]), y2=float(spec.box[3]), source=spec.source,
                 region_rows=[int(r) for r in regions.rows[spec.rows]])
        for spec in fragments_of(regions.boxes, regions.scores, regions.kinds)
    ]
    session.add_all(fragments)
    session.flush()
    return [f.id for f in fragments]


def get_or_create_phrases(session: Session, texts: list[str]) -> tuple[dict[str, Phrase], list[str]]:
    found = {p.text: p for p in session.scalars(select(Phrase).where(Phrase.text.in_(texts)))} \
        if texts else {}
    created = [t for t in texts if t not in found]
    for text in created:
        found[text] = Phrase(text=text)
        session.add(found[text])
    session.flush()
    return found, created


def drop_orphan_phrases(session: Session, phrase_ids: list[int]) -> list[int]:
    """Delete those of ``phrase_ids`` that no artwork links to any more; returns them."""
    if not phrase_ids:
        return []
    linked = set(session.scalars(
        select(ArtworkPhrase.phrase_id).where(ArtworkPhrase.phrase_id.in_(phrase_ids))
    ))
    orphans = sorted(set(phrase_ids) - linked)
    if orphans:
        session.execute(delete(Phrase).where(Phrase.id.in_(orphans)))
    return orphans
