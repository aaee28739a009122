"""An artwork's regions: its rows in the feature store, its uploaded image file, and the
region set of a box on it.

The image's own record (whole image + extracted regions, and annotation rows a collection's
extraction pooled) lives in the store under the image's sha256; boxes pooled later live
under a key naming the image and those boxes, so two artworks that share an image but not
annotations never see each other's annotation rows. Keys name content, so a record another
writer stored first serves as well as ours.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.models import Artwork, Fragment, Region
from index.atomic import write_bytes_atomic
from index.featurestore import FeatureStore, FeatureStoreError, RegionRecord
from index.fragments import ANNOTATION, DEFAULT_MAX_MEMBERS, EXTRACTED, WHOLE, region_set_members

if TYPE_CHECKING:
    from app.services.changes import IndexChange
    from models.regions import RegionExtractor  # pulls in torch

log = logging.getLogger(__name__)

BOX_MATCH_PIXELS = 0.5  # an annotation box matches a stored row when every corner is this close


def box_member_rows(artwork: Artwork, box: np.ndarray) -> list[int]:
    """The feature-store rows of the artwork's extracted regions in the region set of ``box``
    (``index.fragments.region_set_members``: mostly inside it, best first). A box's region set
    is its own pooled feature, then these: for the index's fragments and for /annotate alike."""
    extracted = [r for r in artwork.regions if r.kind == EXTRACTED]
    members = region_set_members(
        np.asarray(box, dtype=np.float32).reshape(4),
        np.asarray([r.box for r in extracted], dtype=np.float32).reshape(-1, 4),
        np.asarray([r.score for r in extracted], dtype=np.float32), max_members=DEFAULT_MAX_MEMBERS,
    )
    return [int(extracted[i].store_row) for i in members]


def need_extractor(extractor: RegionExtractor | None, what: str) -> RegionExtractor:
    if extractor is None:
        raise ValueError(f"a region extractor is needed to {what}, and none was given")
    return extractor


def append_once(store: FeatureStore, key: str, record: RegionRecord) -> None:
    """Append unless another writer stored the same content first (the key names the
    content, so their record serves as well as ours)."""
    try:
        store.append(key, record)
    except FeatureStoreError:
        if not store.has(key):  # refused for another reason
            raise


def boxes_key(image_sha256: str, boxes: np.ndarray) -> str:
    """The store key of ``boxes`` (n, 4) float32 pooled on the image ``image_sha256``."""
    return f"{image_sha256}:boxes:{hashlib.sha256(boxes.tobytes()).hexdigest()[:32]}"


def store_regions(
    store: FeatureStore, extractor: RegionExtractor | None, image: Image.Image, image_sha256: str,
    annotation_boxes: list[tuple[float, float, float, float]], record: RegionRecord | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The artwork's regions as (global store rows, boxes, scores, kinds), appending to the
    store what it lacks: the image's record (``record``, else extracted), then the
    annotation boxes it has no row for, pooled."""
    if not store.has(image_sha256):
        if record is None:
            record = need_extractor(extractor, "extract regions").extract([image])[0]
        append_once(store, image_sha256, record)
    start, _ = store.rows_of(image_sha256)
    base = store.get(image_sha256)
    base_rows = start + np.arange(len(base), dtype=np.int64)
    keep = np.isin(base.kinds, (WHOLE, EXTRACTED))
    wanted = np.asarray(annotation_boxes, dtype=np.float32).reshape(-1, 4)
    matched = np.zeros(len(wanted), dtype=bool)
    for i, box in enumerate(wanted):
        close = (base.kinds == ANNOTATION) & (np.abs(base.boxes - box).max(axis=1) <= BOX_MATCH_PIXELS)
        if close.any():
            keep[np.flatnonzero(close)[0]] = True
            matched[i] = True
    parts = [(base_rows[keep], base.boxes[keep], base.scores[keep], base.kinds[keep])]
    missing = wanted[~matched]
    if len(missing):
        key = boxes_key(image_sha256, missing)
        if not store.has(key):
            pooled = need_extractor(extractor, "pool annotation boxes").pool(image, missing, kind=ANNOTATION)
            append_once(store, key, pooled)
        extra_start, count = store.rows_of(key)
        extra = store.get(key)
        parts.append((extra_start + np.arange(count, dtype=np.int64), extra.boxes, extra.scores,
                      extra.kinds))
    return tuple(np.concatenate(column) for column in zip(*parts, strict=True))  # type: ignore[return-value]


def save_image(folder: Path, image_bytes: bytes, image_sha256: str) -> Path:
    """Keep the uploaded file, named by content (so a re-upload is a no-op), atomically."""
    with Image.open(io.BytesIO(image_bytes)) as probe:
        suffix = {"JPEG": ".jpg"}.get(probe.format or "", f".{(probe.format or 'img').lower()}")
    path = folder / image_sha256[:2] / f"{image_sha256}{suffix}"
    if not path.exists():
        write_bytes_atomic(path, image_bytes)
    return path


def add_box_fragment(session: Session, *, store: FeatureStore, extractor: RegionExtractor | None,
                     artwork: Artwork, box: Sequence[float], change: IndexChange) -> Fragment | None:
    """The annotation fragment of ``box`` on ``artwork``, made when it has none yet: the box
    is pooled from the artwork's image (one detector pass, stored under a key naming the
    image and the box), its region set is the box plus :func:`box_member_rows`, and the new
    fragment goes into ``change`` for the index. None, with a warning, when there is no
    image or no detector to pool it with (an artwork imported with precomputed features).
    Inside the caller's transaction; nothing is committed here."""
    from collection.images import load_image

    wanted = np.asarray(box, dtype=np.float32).reshape(4)
    for fragment in session.scalars(select(Fragment).where(Fragment.artwork_id == artwork.id,
                                                            Fragment.source == "annotation")):
        if np.abs(np.asarray(fragment.box) - wanted).max() <= BOX_MATCH_PIXELS:
            return fragment
    key = boxes_key(artwork.image_sha256, wanted[None])
    if not store.has(key):
        if extractor is None or not Path(artwork.image_location or "").is_file():
            log.warning("artwork %s: no image or no detector to pool the box %s with; the "
                        "annotation is kept, the box is not a fragment", artwork.external_id, box)
            return None
        image = load_image(artwork.image_location, name=f"artwork {artwork.external_id!r}: image")
        append_once(store, key, extractor.pool(image, wanted[None], kind=ANNOTATION))
    start, _ = store.rows_of(key)
    x1, y1, x2, y2 = (float(v) for v in store.get(key).boxes[0])
    session.add(Region(artwork_id=artwork.id, store_row=int(start), x1=x1, y1=y1, x2=x2, y2=y2,
                       score=1.0, kind=ANNOTATION))
    fragment = Fragment(artwork_id=artwork.id, x1=x1, y1=y1, x2=x2, y2=y2, source="annotation",
                        region_rows=[int(start), *box_member_rows(artwork, np.array([x1, y1, x2, y2]))])
    session.add(fragment)
    session.flush()
    change.added_fragments.append(fragment.id)
    return fragment
