"""Ingestion: one artwork (image + metadata + captions + annotations) into the feature store
and the database, as one library call that the HTTP service and the command line share.

Steps: decode and validate the image; regions (the extractor's boxes, plus pooled features
for annotation boxes) appended to the feature store under the image's sha256, reused when
present; noun phrases of the captions; then every database row in one transaction.
Idempotent: the same input twice is reported "unchanged" and writes nothing. A failure at
any step rolls the transaction back: no partial artwork. A feature-store record left behind
by a failed ingest is harmless: it is keyed by image content and reused by the next try.

When ``engine_or_extractor`` is the retrieval :class:`~app.services.retrieval.Engine`, its
FAISS indexes are updated after the commit (no rebuild).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from app.db.models import (
    Annotation,
    Artwork,
    ArtworkPhrase,
    Caption,
    Fragment,
    Phrase,
    Region,
)
from collection.images import load_image
from index.atomic import write_bytes_atomic
from index.featurestore import FeatureStore, FeatureStoreError, RegionRecord
from index.fragments import (
    ANNOTATION,
    DEFAULT_MAX_MEMBERS,
    EXTRACTED,
    WHOLE,
    fragments_of,
    region_set_members,
)

log = logging.getLogger(__name__)

Status = Literal["created", "replaced", "unchanged"]
BOX_MATCH_PIXELS = 0.5  # an annotation box matches a stored row when every corner is this close


@dataclass(frozen=True)
class IngestResult:
    artwork_id: int
    external_id: str
    status: Status
    regions: int
    fragments: int
    phrases: int


@dataclass
class IndexChange:
    """Database ids whose vectors an index must add or drop after a committed change."""

    added_fragments: list[int] = field(default_factory=list)
    removed_fragments: list[int] = field(default_factory=list)
    added_phrases: list[int] = field(default_factory=list)
    removed_phrases: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class _AnnotationIn:
    phrase: str
    box: tuple[float, float, float, float]


def ingest_artwork(
    session: Session,
    *,
    engine_or_extractor: Any,
    store: FeatureStore,
    external_id: str,
    image_bytes: bytes,
    title: str = "",
    metadata: Mapping[str, Any] | None = None,
    captions: Sequence[str] = (),
    annotations: Iterable[Any] = (),
    split: str | None = None,
    phrases: Sequence[str] | None = None,
    record: RegionRecord | None = None,
    image_dir: str | Path | None = None,
    image_location: str | None = None,
    max_pixels: int | None = None,
    image: Image.Image | None = None,
) -> IngestResult:
    """Create, replace or confirm (unchanged) the artwork ``external_id``.

    annotations: items with ``phrase`` and ``box`` ([x1, y1, x2, y2], original pixels), as
    objects or dicts. phrases: the captions' phrases when already extracted (a collection
    holds them); None extracts them here. record: the image's regions when already
    extracted (a collection's feature store). The image is kept at ``image_location`` if
    given, else written under ``image_dir`` (default: the engine's) named by its sha256.
    image: ``image_bytes`` already decoded by :func:`decode_image` (not decoded again).
    """
    external_id = _check_external_id(external_id)
    captions = [_check_text(c, f"captions[{i}]") for i, c in enumerate(captions)]
    metadata = dict(metadata or {})
    if image is None:
        image = decode_image(external_id, image_bytes, max_pixels)
    width, height = image.size
    notes = [_annotation(item, i, width, height) for i, item in enumerate(annotations)]
    image_sha256 = hashlib.sha256(image_bytes).hexdigest()
    content_sha256 = _content_hash(image_sha256, title, metadata, captions, notes, split, phrases)

    existing = session.scalar(select(Artwork).where(Artwork.external_id == external_id))
    if existing is not None and existing.content_sha256 == content_sha256:
        result = IngestResult(existing.id, external_id, "unchanged", len(existing.regions),
                              len(existing.fragments), len(existing.phrase_links))
        session.rollback()  # ends the read-only transaction the lookups began
        return result

    extractor = getattr(engine_or_extractor, "extractor", engine_or_extractor)
    rows, boxes, scores, kinds = _store_regions(
        store, extractor, image, image_sha256, [n.box for n in notes], record
    )
    if image_location is None:
        folder = image_dir or getattr(engine_or_extractor, "image_dir", None)
        if folder is None:
            raise ValueError(f"artwork {external_id!r}: give image_location or image_dir")
        image_location = str(_save_image(Path(folder), image_bytes, image_sha256))
    if phrases is None:
        from collection.phrases import extract_phrases_batch

        phrases = [p for found in extract_phrases_batch(captions) for p in found]
    change = IndexChange()
    try:
        artwork = _write_rows(
            session, existing=existing, change=change, external_id=external_id, title=title,
            metadata=metadata, captions=captions, notes=notes, split=split,
            phrases=phrases, image_location=image_location, image_sha256=image_sha256,
            content_sha256=content_sha256, width=width, height=height,
            rows=rows, boxes=boxes, scores=scores, kinds=kinds,
        )
        session.commit()
    except BaseException:
        session.rollback()
        raise
    status: Status = "created" if existing is None else "replaced"
    log.info("%s artwork %s (id %d): %d regions, %d fragments, %d phrases", status, external_id,
             artwork.id, len(rows), len(change.added_fragments), len(artwork.phrase_links))
    _apply(engine_or_extractor, session, change)
    return IngestResult(artwork.id, external_id, status, len(rows),
                        len(change.added_fragments), len(artwork.phrase_links))


def decode_image(external_id: str, image_bytes: bytes, max_pixels: int | None = None) -> Image.Image:
    """The uploaded image of artwork ``external_id``, decoded and checked (ImageError names
    the artwork)."""
    name = f"artwork {_check_external_id(external_id)!r}: image"
    return load_image(image_bytes, name=name, **({"max_pixels": max_pixels} if max_pixels else {}))


def detect_regions(
    engine_or_extractor: Any, store: FeatureStore, *, image: Image.Image, image_bytes: bytes,
    annotations: Iterable[Any] = (),
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
    extractor = _need(getattr(engine_or_extractor, "extractor", engine_or_extractor), "extract regions")
    return extractor.extract([image], extra_boxes=[np.asarray(boxes, dtype=np.float32).reshape(-1, 4)])[0]


def add_box_fragment(session: Session, *, engine: Any, artwork: Artwork,
                     box: Sequence[float], change: IndexChange) -> Fragment | None:
    """The annotation fragment of ``box`` on ``artwork``, made when it has none yet: the box
    is pooled from the artwork's image (one detector pass, stored under a key naming the
    image and the box), its region set is the box plus the artwork's extracted regions
    inside it, and the new fragment goes into ``change`` for the index. None, with a
    warning, when there is no image or no detector to pool it with (an artwork imported
    with precomputed features). Inside the caller's transaction; nothing is committed here."""
    wanted = np.asarray(box, dtype=np.float32).reshape(4)
    for fragment in session.scalars(select(Fragment).where(Fragment.artwork_id == artwork.id,
                                                            Fragment.source == "annotation")):
        if np.abs(np.asarray(fragment.box) - wanted).max() <= BOX_MATCH_PIXELS:
            return fragment
    store = engine.store
    key = f"{artwork.image_sha256}:boxes:{hashlib.sha256(wanted[None].tobytes()).hexdigest()[:32]}"
    if not store.has(key):
        if engine.extractor is None or not Path(artwork.image_location or "").is_file():
            log.warning("artwork %s: no image or no detector to pool the box %s with; the "
                        "annotation is kept, the box is not a fragment", artwork.external_id, box)
            return None
        image = load_image(artwork.image_location, name=f"artwork {artwork.external_id!r}: image")
        _append_once(store, key, engine.extractor.pool(image, wanted[None], kind=ANNOTATION))
    start, _ = store.rows_of(key)
    record = store.get(key)
    session.add(Region(artwork_id=artwork.id, store_row=int(start), x1=float(record.boxes[0, 0]),
                       y1=float(record.boxes[0, 1]), x2=float(record.boxes[0, 2]),
                       y2=float(record.boxes[0, 3]), score=1.0, kind=ANNOTATION))
    extracted = [r for r in artwork.regions if r.kind == EXTRACTED]
    members = region_set_members(
        record.boxes[0], np.asarray([r.box for r in extracted], dtype=np.float32).reshape(-1, 4),
        np.asarray([r.score for r in extracted]), max_members=DEFAULT_MAX_MEMBERS)
    fragment = Fragment(artwork_id=artwork.id, x1=float(record.boxes[0, 0]), y1=float(record.boxes[0, 1]),
                        x2=float(record.boxes[0, 2]), y2=float(record.boxes[0, 3]), source="annotation",
                        region_rows=[int(start), *(int(extracted[i].store_row) for i in members)])
    session.add(fragment)
    session.flush()
    change.added_fragments.append(fragment.id)
    return fragment


def delete_artwork(session: Session, *, engine: Any = None, external_id: str) -> bool:
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
        session.delete(artwork)
        session.flush()
        change.removed_phrases = _drop_orphan_phrases(session, phrase_ids)
        session.commit()
    except BaseException:
        session.rollback()
        raise
    log.info("deleted artwork %s: %d fragments, %d orphan phrases", external_id,
             len(change.removed_fragments), len(change.removed_phrases))
    _apply(engine, session, change)
    return True


def ingest_collection(
    session: Session,
    *,
    engine_or_extractor: Any,
    store: FeatureStore,
    collection: Any,
    progress: bool = True,
) -> Counter[str]:
    """Ingest every artwork of a :class:`collection.layout.Collection` (one transaction each).

    Regions come from the collection's own feature store (``<root>/features``) when it holds
    the artwork, else from the extractor. Images stay where the collection keeps them.
    Returns how many artworks were created, replaced and unchanged.
    """
    from tqdm import tqdm

    source = FeatureStore(collection.root / "features")
    reuse = not (source.extractor and store.extractor and source.extractor != store.extractor)
    if not reuse:
        # Features of two detectors must never sit side by side in one store.
        log.warning("not reusing %s: written by region extractor %s…, this store holds %s…",
                    source.root, source.extractor[:12], store.extractor[:12])
    counts: Counter[str] = Counter()
    for artwork in tqdm(collection.artworks, desc="ingest", unit="artwork", disable=not progress):
        path = collection.image_path(artwork)
        result = ingest_artwork(
            session, engine_or_extractor=engine_or_extractor, store=store,
            external_id=artwork.id, image_bytes=path.read_bytes(), title=artwork.title,
            metadata=artwork.metadata, captions=artwork.captions,
            annotations=artwork.annotations, split=artwork.split, phrases=artwork.phrases,
            record=source.get(artwork.id) if reuse and source.has(artwork.id) else None,
            image_location=str(path.resolve()),
        )
        counts[result.status] += 1
    log.info("ingested %s from %s: %s", len(collection.artworks), collection.root, dict(counts))
    return counts


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


def _annotation(item: Any, position: int, width: int, height: int) -> _AnnotationIn:
    """A validated annotation; boxes must lie on the image (0 <= x1 < x2 <= width)."""
    from collection.phrases import normalise_phrase

    where = f"annotations[{position}]"
    phrase = item.get("phrase") if isinstance(item, Mapping) else getattr(item, "phrase", None)
    box = item.get("box") if isinstance(item, Mapping) else getattr(item, "box", None)
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
    return _AnnotationIn(text, (x1, y1, x2, y2))


def _content_hash(image_sha256: str, title: str, metadata: dict, captions: list[str],
                  notes: list[_AnnotationIn], split: str | None,
                  phrases: Sequence[str] | None) -> str:
    content = {
        "image": image_sha256, "title": title, "metadata": metadata, "captions": captions,
        "annotations": [[n.phrase, list(n.box)] for n in notes], "split": split,
        "phrases": list(phrases) if phrases is not None else None,
    }
    encoded = json.dumps(content, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(encoded.encode("utf-8")).hexdigest()


# -- regions ------------------------------------------------------------------------------


def _store_regions(
    store: FeatureStore, extractor: Any, image: Image.Image, image_sha256: str,
    annotation_boxes: list[tuple[float, float, float, float]], record: RegionRecord | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The artwork's regions as (global store rows, boxes, scores, kinds), appending to the
    store what it lacks.

    The image's own record (whole image + extracted regions, and annotation rows a
    collection's extraction pooled) lives under its sha256. Annotation boxes it lacks are
    pooled and stored under a key naming the image and those boxes, so two artworks that
    share an image but not annotations never see each other's annotation rows.
    """
    if not store.has(image_sha256):
        if record is None:
            record = _need(extractor, "extract regions").extract([image])[0]
        _append_once(store, image_sha256, record)
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
        key = f"{image_sha256}:boxes:{hashlib.sha256(missing.tobytes()).hexdigest()[:32]}"
        if not store.has(key):
            pooled = _need(extractor, "pool annotation boxes").pool(image, missing, kind=ANNOTATION)
            _append_once(store, key, pooled)
        extra_start, count = store.rows_of(key)
        extra = store.get(key)
        parts.append((extra_start + np.arange(count, dtype=np.int64), extra.boxes, extra.scores,
                      extra.kinds))
    return tuple(np.concatenate(column) for column in zip(*parts, strict=True))  # type: ignore[return-value]


def _append_once(store: FeatureStore, key: str, record: RegionRecord) -> None:
    """Append unless another writer stored the same content first (the key names the
    content, so their record serves as well as ours)."""
    try:
        store.append(key, record)
    except FeatureStoreError:
        if not store.has(key):  # refused for another reason
            raise


def _need(extractor: Any, what: str) -> Any:
    if extractor is None:
        raise ValueError(f"a region extractor is needed to {what}, and none was given")
    return extractor


def _save_image(folder: Path, image_bytes: bytes, image_sha256: str) -> Path:
    """Keep the uploaded file, named by content (so a re-upload is a no-op), atomically."""
    with Image.open(io.BytesIO(image_bytes)) as probe:
        suffix = {"JPEG": ".jpg"}.get(probe.format or "", f".{(probe.format or 'img').lower()}")
    path = folder / image_sha256[:2] / f"{image_sha256}{suffix}"
    if not path.exists():
        write_bytes_atomic(path, image_bytes)
    return path


# -- rows ---------------------------------------------------------------------------------


def _write_rows(
    session: Session, *, existing: Artwork | None, change: IndexChange, external_id: str,
    title: str, metadata: dict, captions: list[str], notes: list[_AnnotationIn],
    split: str | None, phrases: Sequence[str], image_location: str, image_sha256: str,
    content_sha256: str, width: int, height: int, rows: np.ndarray, boxes: np.ndarray,
    scores: np.ndarray, kinds: np.ndarray,
) -> Artwork:
    """Every row of the artwork, inside the caller's transaction (nothing is committed here)."""
    old_phrase_ids: list[int] = []
    if existing is None:
        artwork = Artwork(external_id=external_id)
        session.add(artwork)
    else:
        artwork = existing
        change.removed_fragments = [f.id for f in artwork.fragments]
        old_phrase_ids = [link.phrase_id for link in artwork.phrase_links]
        # Replacing: the artwork keeps its id; everything it owns is written anew.
        for owned in (Caption, Region, Fragment, Annotation, ArtworkPhrase):
            session.execute(delete(owned).where(owned.artwork_id == artwork.id))
        session.expire(artwork, ["captions", "regions", "fragments", "annotations", "phrase_links"])
    artwork.title = title
    artwork.meta = metadata
    artwork.split = split
    artwork.image_location = image_location
    artwork.image_sha256 = image_sha256
    artwork.content_sha256 = content_sha256
    artwork.width, artwork.height = width, height
    session.flush()

    session.add_all(Caption(artwork_id=artwork.id, position=i, text=text)
                    for i, text in enumerate(captions))
    texts = list(dict.fromkeys([*phrases, *(n.phrase for n in notes)]))
    phrase_rows, created = _get_or_create_phrases(session, texts)
    session.add_all(ArtworkPhrase(artwork_id=artwork.id, phrase_id=phrase_rows[t].id) for t in texts)
    session.add_all(
        Annotation(artwork_id=artwork.id, phrase_id=phrase_rows[n.phrase].id, x1=n.box[0],
                   y1=n.box[1], x2=n.box[2], y2=n.box[3], source="ground_truth")
        for n in notes
    )
    session.add_all(
        Region(artwork_id=artwork.id, store_row=int(row), x1=float(b[0]), y1=float(b[1]),
               x2=float(b[2]), y2=float(b[3]), score=float(s), kind=int(k))
        for row, b, s, k in zip(rows, boxes, scores, kinds, strict=True)
    )
    fragments = [
        Fragment(artwork_id=artwork.id, x1=float(spec.box[0]), y1=float(spec.box[1]),
                 x2=float(spec.box[2]), y2=float(spec.box[3]), source=spec.source,
                 region_rows=[int(r) for r in rows[spec.rows]])
        for spec in fragments_of(boxes, scores, kinds)
    ]
    session.add_all(fragments)
    session.flush()
    change.added_fragments = [f.id for f in fragments]
    change.added_phrases = [phrase_rows[t].id for t in created]
    kept = {phrase_rows[t].id for t in texts}
    change.removed_phrases = _drop_orphan_phrases(
        session, [p for p in old_phrase_ids if p not in kept]
    )
    session.refresh(artwork, ["phrase_links"])
    return artwork


def _get_or_create_phrases(session: Session, texts: list[str]) -> tuple[dict[str, Phrase], list[str]]:
    found = {p.text: p for p in session.scalars(select(Phrase).where(Phrase.text.in_(texts)))} \
        if texts else {}
    created = [t for t in texts if t not in found]
    for text in created:
        found[text] = Phrase(text=text)
        session.add(found[text])
    session.flush()
    return found, created


def _drop_orphan_phrases(session: Session, phrase_ids: list[int]) -> list[int]:
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


def _apply(engine: Any, session: Session, change: IndexChange) -> None:
    """Tell the retrieval engine (when there is one) which vectors to add and drop."""
    apply_change = getattr(engine, "apply_change", None)
    if apply_change is not None:
        apply_change(session, change)


def ingest_collection_into(
    *, database_url: str, collection: str | Path, data_dir: str | Path,
    detector: str | Path, scan: str | Path | None = None, device: str = "auto",
    progress: bool = True,
) -> Counter[str]:
    """Ingest a collection folder into the database at ``database_url`` and the feature store
    under ``data_dir``, then (with a ``scan`` checkpoint) bring the indexes up to date, so a
    service started next loads them instead of rebuilding. Used by `artalign ingest`."""
    from app.db.session import create_db_engine, session_factory
    from collection.layout import Collection
    from models.regions import RegionExtractor

    loaded = Collection.load(collection)
    database = create_db_engine(database_url)
    try:
        extractor = RegionExtractor.from_checkpoint(detector, device=resolve_device(device))
        store = FeatureStore(Path(data_dir) / "features", extractor=extractor.version)
        with session_factory(database)() as session:
            counts = ingest_collection(session, engine_or_extractor=extractor, store=store,
                                       collection=loaded, progress=progress)
        if scan is not None:
            from app.services.retrieval import Engine

            Engine.load(database=database, scan_checkpoint=scan, detector_checkpoint=None,
                        data_dir=data_dir, device=device)
    finally:
        database.dispose()
    return counts


def resolve_device(device: str) -> str:
    """"auto" -> "cuda" when torch sees a GPU, else "cpu"; anything else as given."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
