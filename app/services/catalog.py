"""The catalogue outside retrieval: keyword-only reads the routes call, image files, and the
one curator write (accepting a phrase for a box on an artwork).

Ingestion writes go through :mod:`app.services.ingest`. The reads need no model, so the
routes run them on FastAPI's thread pool, not in the inference slots. An unknown id raises
``LookupError`` and bad input ``ValueError``; app.api.errors turns them into 404 and 422.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image
from sqlalchemy import func, select
from sqlalchemy.orm import Session, selectinload

from app.db.models import Annotation, Artwork, ArtworkPhrase, Fragment, Phrase
from app.services.filters import ArtworkFilter
from index.atomic import write_atomic
from index.folding import fold, rank

if TYPE_CHECKING:
    from app.services.retrieval import Engine

THUMBNAIL_SIDE = 256
CROP_MAX_SIDE = 512
JPEG_QUALITY = 85


# -- reads ----------------------------------------------------------------------------------


def list_artworks(
    session: Session, *, filters: ArtworkFilter, limit: int, offset: int
) -> tuple[list[Artwork], int]:
    """A page of the artworks ``filters`` keep (oldest first), and the total that match."""
    query = filters.apply(select(Artwork))
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    page = session.scalars(query.order_by(Artwork.id).limit(limit).offset(offset)).all()
    return list(page), total


def get_artwork(session: Session, artwork_id: int, *, full: bool = False) -> Artwork:
    """The artwork; with ``full`` its captions, fragments and regions loaded too."""
    query = select(Artwork).where(Artwork.id == artwork_id)
    if full:
        query = query.options(selectinload(Artwork.captions), selectinload(Artwork.fragments),
                              selectinload(Artwork.regions))
    artwork = session.scalar(query)
    if artwork is None:
        raise LookupError(f"no artwork {artwork_id!r}")
    return artwork


def shown_fragments(artwork: Artwork, *, fold_iou: float) -> list[tuple[Fragment, list[int]]]:
    """The artwork's fragments, one per thing (:mod:`index.folding`), each with the ids of
    those folded into it: ranked by the detector's confidence in the box (an annotation's or
    the whole image's is 1), ties by id. ``artwork`` is loaded ``full``."""
    fragments = artwork.fragments
    score_of_row = {region.store_row: region.score for region in artwork.regions}
    scores = [score_of_row.get(f.region_rows[0], 0.0) for f in fragments]
    kept = fold([f.box for f in fragments], [artwork.id] * len(fragments),
                rank(scores, [f.id for f in fragments]), fold_iou)
    return [(fragments[k.position], [fragments[i].id for i in k.also]) for k in kept]


def phrases_of(session: Session, artwork_id: int) -> list[str]:
    """The phrases that describe an artwork, alphabetically."""
    query = (
        select(Phrase.text)
        .join(ArtworkPhrase, ArtworkPhrase.phrase_id == Phrase.id)
        .where(ArtworkPhrase.artwork_id == artwork_id)
        .order_by(Phrase.text)
    )
    return list(session.scalars(query))


def annotations_of(session: Session, artwork_id: int) -> list[Annotation]:
    """The artwork's annotations (ingested and curator's), oldest first, phrases loaded."""
    query = (
        select(Annotation)
        .where(Annotation.artwork_id == artwork_id)
        .options(selectinload(Annotation.phrase))
        .order_by(Annotation.id)
    )
    return list(session.scalars(query))


def get_fragment(session: Session, fragment_id: int) -> Fragment:
    """The fragment, its artwork loaded."""
    fragment = session.scalar(
        select(Fragment).where(Fragment.id == fragment_id).options(selectinload(Fragment.artwork))
    )
    if fragment is None:
        raise LookupError(f"no fragment {fragment_id!r}")
    return fragment


# -- image files ----------------------------------------------------------------------------


def image_path(artwork: Artwork) -> Path:
    """Where the artwork's image file is (ingestion stores its location)."""
    path = Path(artwork.image_location)
    if not path.is_file():
        raise LookupError(f"no image file for artwork {artwork.external_id!r}")
    return path


def thumbnail(artwork: Artwork, data_dir: Path) -> Path:
    """A JPEG at most THUMBNAIL_SIDE pixels a side, made once and kept beside the data.

    Named by the image's sha256, so a replaced image gets a new thumbnail and two artworks
    with the same image share one.
    """
    target = data_dir / "thumbnails" / f"{artwork.image_sha256}-{THUMBNAIL_SIDE}.jpg"
    if target.is_file():
        return target
    with Image.open(image_path(artwork)) as image:
        small = image.convert("RGB")
        small.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    write_atomic(target, lambda handle: small.save(handle, "JPEG", quality=JPEG_QUALITY))
    return target


def crop_jpeg(fragment: Fragment) -> bytes:
    """The fragment's box cut out of its artwork's image, at most CROP_MAX_SIDE a side."""
    with Image.open(image_path(fragment.artwork)) as image:
        width, height = image.size
        box = (
            max(0, int(fragment.x1)), max(0, int(fragment.y1)),
            min(width, max(int(fragment.x1) + 1, round(fragment.x2))),
            min(height, max(int(fragment.y1) + 1, round(fragment.y2))),
        )
        crop = image.convert("RGB").crop(box)
    crop.thumbnail((CROP_MAX_SIDE, CROP_MAX_SIDE))
    buffer = io.BytesIO()
    crop.save(buffer, "JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


# -- curator decisions ----------------------------------------------------------------------


def accept_annotation(
    session: Session, *, engine: Engine, artwork_id: int, box: list[float], phrase: str
) -> Annotation:
    """Store a phrase a curator accepted for a box on an artwork.

    The annotation joins the artwork's ground truth (source "curator"); its phrase now
    describes the artwork, and a phrase new to the collection enters the phrase index at
    once, so the next crop can be annotated with it. The box becomes an annotation fragment
    (unless the artwork has one there already), so a search finds exactly that box. Raises
    LookupError for an unknown artwork, ValueError for a phrase with no words or a box off
    the image.
    """
    from app.services.artwork_regions import add_box_fragment
    from app.services.changes import IndexChange, record_change
    from collection.phrases import normalise_phrase

    text = normalise_phrase(phrase)
    if not text:
        raise ValueError(f"phrase {phrase!r} has no words once normalised")
    artwork = session.get(Artwork, artwork_id)
    if artwork is None:
        raise LookupError(f"no artwork {artwork_id!r}")
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
        add_box_fragment(session, store=engine.store, extractor=engine.extractor, artwork=artwork,
                         box=box, change=change)
        record_change(session, change)
        session.commit()
    except BaseException:
        session.rollback()
        raise
    if change:
        engine.indexes.catch_up(session)
    annotation.phrase = row
    return annotation
