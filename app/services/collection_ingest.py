"""A whole collection folder into the feature store and the database, one artwork at a time
through :func:`app.services.ingest.ingest_artwork`, reusing the collection's own features."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy.orm import Session

from app.services.ingest import ingest_artwork
from index.featurestore import FeatureStore

if TYPE_CHECKING:
    from collection.layout import Collection
    from models.regions import RegionExtractor  # pulls in torch

log = logging.getLogger(__name__)


def ingest_collection(
    session: Session,
    *,
    extractor: RegionExtractor | None,
    store: FeatureStore,
    collection: Collection,
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
            session, extractor=extractor, store=store,
            external_id=artwork.id, image_bytes=path.read_bytes(), title=artwork.title,
            metadata=artwork.metadata, captions=artwork.captions,
            annotations=artwork.annotations, split=artwork.split, phrases=artwork.phrases,
            record=source.get(artwork.id) if reuse and source.has(artwork.id) else None,
            image_location=str(path.resolve()),
        )
        counts[result.status] += 1
    log.info("ingested %s from %s: %s", len(collection.artworks), collection.root, dict(counts))
    return counts


def ingest_collection_into(
    *, database_url: str, collection: str | Path, data_dir: str | Path,
    detector: str | Path, scan: str | Path | None = None, device: str = "auto",
    progress: bool = True, index_dir: str | Path | None = None,
) -> Counter[str]:
    """Ingest a collection folder into the database at ``database_url`` and the feature store
    under ``data_dir``, then (with a ``scan`` checkpoint) bring the indexes up to date and
    save a snapshot (in ``index_dir``, default ``data_dir/index``), so a service started next
    loads it instead of replaying or rebuilding.
    Used by `artalign ingest`."""
    from app.db.session import create_db_engine, session_factory
    from collection.layout import Collection
    from models.checkpoint import resolve_device
    from models.regions import RegionExtractor

    loaded = Collection.load(collection)
    database = create_db_engine(database_url)
    try:
        extractor = RegionExtractor.from_checkpoint(detector, device=resolve_device(device))
        store = FeatureStore(Path(data_dir) / "features", extractor=extractor.version)
        with session_factory(database)() as session:
            counts = ingest_collection(session, extractor=extractor, store=store,
                                       collection=loaded, progress=progress)
        if scan is not None:
            from app.services.retrieval import Engine

            engine = Engine.load(database=database, scan_checkpoint=scan, detector_checkpoint=None,
                                 data_dir=data_dir, device=device, index_dir=index_dir)
            engine.indexes.save_snapshot()
    finally:
        database.dispose()
    return counts
