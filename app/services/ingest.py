"""Ingestion: one artwork (image + metadata + captions + annotations) into the feature store
and the database, as one library call that the HTTP service and the command line share.

Steps: decode and validate the image; regions (the extractor's boxes, plus pooled features
for annotation boxes) appended to the feature store under the image's sha256, reused when
present (:mod:`app.services.artwork_regions`); noun phrases of the captions; then every
database row in one transaction (:mod:`app.services.artwork_rows`). Idempotent: the same
input twice is reported "unchanged" and writes nothing. A failure at any step rolls the
transaction back: no partial artwork. A feature-store record left behind by a failed ingest
is harmless: it is keyed by image content and reused by the next try.

Ingest and delete append what they changed to the index change log in their own
transaction (:mod:`app.services.changes`); given the serving
:class:`~app.services.indexes.Indexes`, they bring them up to the log after the commit (no
rebuild, nothing written to disk).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from PIL import Image
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from app.db.models import Artwork
from app.services.artwork_regions import need_extractor, save_image, store_regions
from app.services.artwork_rows import (
    AnnotationIn,
    ArtworkContent,
    StoredRegions,
    delete_owned_rows,
    drop_orphan_phrases,
    write_rows,
)
from app.services.changes import IndexChange, record_change
from app.services.uploads import decode_upload
from collection.layout import Annotation as CollectionAnnotation
from index.featurestore import FeatureStore, RegionRecord

if TYPE_CHECKING:
    from app.services.indexes import Indexes
    from models.regions import RegionExtractor  # pulls in torch

log = logging.getLogger(__name__)

Status = Literal["created", "replaced", "unchanged"]
# An annotation as the API sends it ({"phrase", "box"}) or as a collection holds it.
AnnotationItem = Mapping[str, Any] | CollectionAnnotation


@dataclass(frozen=True)
class IngestResult:
    artwork_id: int
    external_id: str
    status: Status
    regions: int
    fragments: int
    phrases: int


def ingest_artwork(
    session: Session,
    *,
    extractor: RegionExtractor | None,
    store: FeatureStore,
    external_id: str,
    image_bytes: bytes,
    title: str = "",
    metadata: Mapping[str, Any] | None = None,
    captions: Sequence[str] = (),
    annotations: Iterable[AnnotationItem] = (),
    split: str | None = None,
    phrases: Sequence[str] | None = None,
    record: RegionRecord | None = None,
    image_dir: str | Path | None = None,
    image_location: str | None = None,
    max_pixels: int | None = None,
    image: Image.Image | None = None,
    indexes: Indexes | None = None,
) -> IngestResult:
    """Create, replace or confirm (unchanged) the artwork ``external_id``.

    annotations: ``phrase`` and ``box`` ([x1, y1, x2, y2], original pixels) each. phrases:
    the captions' phrases when already extracted (a collection holds them); None extracts
    them here. record: the image's regions when already extracted (a collection's feature
    store). The image is kept at ``image_location`` if given, else written under
    ``image_dir`` named by its sha256. image: ``image_bytes`` already decoded by
    :func:`decode_image` (not decoded again). indexes: brought up to the log after the commit.
    """
    content, image = _content(external_id, image_bytes, image, max_pixels, title=title,
                              metadata=metadata, captions=captions, annotations=annotations,
                              split=split, phrases=phrases)
    existing = session.scalar(select(Artwork).where(Artwork.external_id == content.external_id))
    if existing is not None and existing.content_sha256 == content.sha256():
        result = IngestResult(existing.id, external_id, "unchanged", len(existing.regions),
                              len(existing.fragments), len(existing.phrase_links))
        session.rollback()  # ends the read-only transaction the lookups began
        return result
    regions = StoredRegions(*store_regions(store, extractor, image, content.image_sha256,
                                           [n.box for n in content.notes], record))
    if image_location is None:
        if image_dir is None:
            raise ValueError(f"artwork {external_id!r}: give image_location or image_dir")
        image_location = str(save_image(Path(image_dir), image_bytes, content.image_sha256))
    try:
        artwork = write_rows(session, existing=existing, content=content,
                             phrases=_phrases(content), image_location=image_location,
                             regions=regions, change=(change := IndexChange()))
        record_change(session, change)  # last: the log's lock is held until the commit
        session.commit()
    except BaseException:
        session.rollback()
        raise
    status: Status = "created" if existing is None else "replaced"
    log.info("%s artwork %s (id %d): %d regions, %d fragments, %d phrases", status, external_id,
             artwork.id, len(regions.rows), len(change.added_fragments), len(artwork.phrase_links))
    if indexes is not None:
        indexes.catch_up(session)
    return IngestResult(artwork.id, external_id, status, len(regions.rows),
                        len(change.added_fragments), len(artwork.phrase_links))


def _content(external_id: str, image_bytes: bytes, image: Image.Image | None,
             max_pixels: int | None, *, title: str, metadata: Mapping[str, Any] | None,
             captions: Sequence[str], annotations: Iterable[AnnotationItem], split: str | None,
             phrases: Sequence[str] | None) -> tuple[ArtworkContent, Image.Image]:
    """The validated content and the decoded image; bad input raises ValueError (or
    ImageError) naming the field."""
    external_id = _check_external_id(external_id)
    captions = [_check_text(c, f"captions[{i}]") for i, c in enumerate(captions)]
    if image is None:
        image = decode_image(external_id, image_bytes, max_pixels)
    width, height = image.size
    return ArtworkContent(
        external_id=external_id, title=title, metadata=dict(metadata or {}), captions=captions,
        notes=[_annotation(item, i, width, height) for i, item in enumerate(annotations)],
        split=split, phrases=phrases, image_sha256=hashlib.sha256(image_bytes).hexdigest(),
        width=width, height=height,
    ), image


def _phrases(content: ArtworkContent) -> Sequence[str]:
    """The captions' phrases: as given, or extracted now."""
    if content.phrases is not None:
        return content.phrases
    from collection.phrases import extract_phrases_batch

    return [p for found in extract_phrases_batch(content.captions) for p in found]


def decode_image(external_id: str, image_bytes: bytes, max_pixels: int | None = None) -> Image.Image:
    """The uploaded image of artwork ``external_id``, decoded and checked (ImageError names
    the artwork)."""
    return decode_upload(image_bytes, name=f"artwork {_check_external_id(external_id)!r}: image",
                         max_pixels=max_pixels)


def detect_regions(
    extractor: RegionExtractor | None, store: FeatureStore, *, image: Image.Image,
    image_bytes: bytes, annotations: Iterable[AnnotationItem] = (),
) -> RegionRecord | None:
    """The detector pass of :func:`ingest_artwork`, for ``record=``: the image's regions with
    the annotation boxes pooled as annotation rows. It reads nothing it would have to lock,
    so a service runs it before taking its write lock and uploads overlap where they cost
    most. None when the store already holds the image (ingest reuses that record). Bad boxes
    raise the same errors ingest_artwork would."""
    if store.has(hashlib.sha256(image_bytes).hexdigest()):
        return None
    width, height = image.size
    boxes = [_annotation(item, i, width, height).box for i, item in enumerate(annotations)]
    return need_extractor(extractor, "extract regions").extract(
        [image], extra_boxes=[np.asarray(boxes, dtype=np.float32).reshape(-1, 4)])[0]


def delete_artwork(session: Session, *, external_id: str, indexes: Indexes | None = None) -> bool:
    """Remove the artwork and everything it owns; False when there is none. Phrases that no
    artwork is described by any more go too. Feature-store rows stay (the store is append-only
    and keyed by image content)."""
    artwork = session.scalar(select(Artwork).where(Artwork.external_id == external_id))
    if artwork is None:
        session.rollback()
        return False
    change = IndexChange(removed_fragments=[f.id for f in artwork.fragments])
    phrase_ids = [link.phrase_id for link in artwork.phrase_links]
    try:
        delete_owned_rows(session, artwork)
        session.execute(delete(Artwork).where(Artwork.id == artwork.id))
        session.expunge(artwork)
        change.removed_phrases = drop_orphan_phrases(session, phrase_ids)
        record_change(session, change)
        session.commit()
    except BaseException:
        session.rollback()
        raise
    log.info("deleted artwork %s: %d fragments, %d orphan phrases", external_id,
             len(change.removed_fragments), len(change.removed_phrases))
    if indexes is not None:
        indexes.catch_up(session)
    return True


# -- validation ---------------------------------------------------------------------------


def _check_external_id(external_id: Any) -> str:
    if not isinstance(external_id, str) or not external_id.strip() or len(external_id) > 200:
        raise ValueError(f"external_id must be a non-empty string of at most 200 characters, "
                         f"got {external_id!r}")
    return external_id


def _check_text(text: Any, where: str) -> str:
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{where} must be a non-empty string, got {text!r}")
    return text


def _annotation(item: AnnotationItem, position: int, width: int, height: int) -> AnnotationIn:
    """A validated annotation; boxes must lie on the image (0 <= x1 < x2 <= width)."""
    from collection.phrases import normalise_phrase

    where = f"annotations[{position}]"
    if isinstance(item, CollectionAnnotation):
        phrase, box = item.phrase, item.box
    elif isinstance(item, Mapping):
        phrase, box = item.get("phrase"), item.get("box")
    else:
        raise ValueError(f"{where} must be an object with 'phrase' and 'box', got {item!r}")
    text = normalise_phrase(_check_text(phrase, f"{where}.phrase"))
    if not text:
        raise ValueError(f"{where}.phrase {phrase!r} has no words once normalised")
    try:
        x1, y1, x2, y2 = (float(v) for v in box)
    except (TypeError, ValueError):
        raise ValueError(f"{where}.box must be [x1, y1, x2, y2], got {box!r}") from None
    if not (0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height):
        raise ValueError(f"{where}.box {[x1, y1, x2, y2]} must satisfy 0 <= x1 < x2 <= {width} "
                         f"and 0 <= y1 < y2 <= {height} (the image's size)")
    return AnnotationIn(text, (x1, y1, x2, y2))
