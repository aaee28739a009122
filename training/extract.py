"""Region extraction over a whole collection on this machine: `artalign extract`.

Per artwork (key = artwork id) the feature store gets the whole image, the top-k detected
regions and the artwork's annotation boxes, as float16 rows, appended a shard at a time.
The pieces both engines share live here too: which artworks are still to do, the annotation
boxes passed as extra boxes, the shard size and the shard append. The Ray path
(training.ray_extract) uses them, so both write the same store.

numpy, torch and tqdm are imported inside the functions: `artalign --help` imports this module.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

    from collection.layout import Artwork, Collection
    from index.featurestore import FeatureStore, RegionRecord
    from models.regions import RegionExtractor

log = logging.getLogger(__name__)

SHARD_RECORDS = 256  # artworks per feature-store shard: an interruption loses at most these


def artworks_to_extract(collection: Collection, store: FeatureStore) -> tuple[list[Artwork], int]:
    """The artworks with an image that ``store`` does not hold yet (so a rerun resumes), and
    how many artworks it already holds."""
    todo = [a for a in collection.artworks if a.image is not None and not store.has(a.id)]
    present = sum(1 for a in collection.artworks if store.has(a.id))
    return todo, present


def annotation_boxes(artwork: Artwork) -> np.ndarray:
    """(m, 4) float32 xyxy original pixels, m = 0 without annotations: the ``extra_boxes``
    of RegionExtractor.extract, pooled as ground-truth regions (kind 2)."""
    import numpy as np

    return np.asarray([a.box for a in artwork.annotations], dtype=np.float32).reshape(-1, 4)


def append_shard(store: FeatureStore, records: Iterable[tuple[str, RegionRecord]]) -> int:
    """Append one shard of ``(artwork id, record)``; returns the rows written."""
    spans = store.append_many(records)
    return sum(count for _, count in spans.values())


def log_store(store: FeatureStore) -> None:
    log.info("feature store %s: %d artworks, %d rows of dim %s", store.root, len(store.keys()),
             len(store), store.dim)


def extract_collection(
    collection: Collection, extractor: RegionExtractor, store: FeatureStore, *, batch_size: int = 8,
    shard_records: int = SHARD_RECORDS, progress: bool = True,
) -> dict[str, int]:
    """Append every artwork of ``collection`` not yet in ``store``; returns counts
    (``extracted``, ``already_present``, ``unreadable``, ``rows``). ``progress``: a bar;
    without it, a log line at every tenth of the work (for a log file).

    An image that cannot be decoded is logged and skipped (the run goes on; rerunning tries
    it again). Records are appended in shards of ``shard_records`` artworks.
    """
    from tqdm import tqdm

    from collection.images import ImageError, load_image

    todo, present = artworks_to_extract(collection, store)
    log.info("extracting %d artworks (%d already in %s)", len(todo), present, store.root)
    pending: list[tuple[str, RegionRecord]] = []
    counts = {"extracted": 0, "already_present": present, "unreadable": 0, "rows": 0}
    started, next_report = time.monotonic(), 0.1
    with tqdm(total=len(todo), desc="extracting", unit="image", disable=not progress) as bar:
        for start in range(0, len(todo), batch_size):
            chunk, images = [], []
            for artwork in todo[start : start + batch_size]:
                try:
                    images.append(load_image(collection.image_path(artwork)))
                    chunk.append(artwork)
                except ImageError as exc:
                    log.warning("skipping %s: %s", artwork.id, exc)
                    counts["unreadable"] += 1
            records = extractor.extract(images, extra_boxes=[annotation_boxes(a) for a in chunk])
            pending.extend((artwork.id, record) for artwork, record in zip(chunk, records, strict=True))
            bar.update(len(todo[start : start + batch_size]))
            done = min(len(todo), start + batch_size)
            if not progress and done >= next_report * len(todo):
                seconds = time.monotonic() - started
                log.info("extracted %d of %d images, %.0f s, %.2f images/s", done, len(todo), seconds,
                         done / max(seconds, 1e-9))
                next_report = math.floor(10 * done / len(todo) + 1) / 10
            if len(pending) >= shard_records:
                counts["rows"] += append_shard(store, pending)
                counts["extracted"] += len(pending)
                pending = []
    if pending:
        counts["rows"] += append_shard(store, pending)
        counts["extracted"] += len(pending)
    log_store(store)
    return counts
