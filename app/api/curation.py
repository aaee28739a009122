"""Curator decisions: storing a phrase a curator accepted for a box on an artwork.

The annotation joins the artwork's ground truth (source "curator"); its phrase now describes
the artwork, and a phrase new to the collection enters the phrase index at once, so the next
crop can be annotated with it.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.api.errors import NotFound
from app.db.models import Annotation, Artwork, ArtworkPhrase, Phrase


def accept_annotation(
    session: Session, *, engine: Any, artwork_id: int, box: list[float], phrase: str
) -> Annotation:
    """Store the annotation; raises NotFound for an unknown artwork, ValueError for a phrase
    with no words or a box off the image."""
    from app.services.ingest import IndexChange
    from collection.phrases import normalise_phrase

    text = normalise_phrase(phrase)
    if not text:
        raise ValueError(f"phrase {phrase!r} has no words once normalised")
    artwork = session.get(Artwork, artwork_id)
    if artwork is None:
        raise NotFound("artwork", artwork_id)
    x1, y1, x2, y2 = box
    if not (x2 <= artwork.width and y2 <= artwork.height):
        raise ValueError(f"box {box} lies outside artwork {artwork_id}'s image "
                         f"({artwork.width}x{artwork.height})")
    change = IndexChange()
    try:
        row = session.scalar(select(Phrase).where(Phrase.text == text))
        if row is None:
            row = Phrase(text=text)
            session.add(row)
            session.flush()
            change.added_phrases.append(row.id)
        if session.get(ArtworkPhrase, (artwork_id, row.id)) is None:
            session.add(ArtworkPhrase(artwork_id=artwork_id, phrase_id=row.id))
        annotation = Annotation(artwork_id=artwork_id, phrase_id=row.id, x1=x1, y1=y1, x2=x2,
                                y2=y2, source="curator")
        session.add(annotation)
        session.commit()
    except BaseException:
        session.rollback()
        raise
    if change.added_phrases:
        engine.apply_change(session, change)
    annotation.phrase = row
    return annotation
