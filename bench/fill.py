"""A stored collection of N fragments made in seconds, for benchmarks of the service at size.

Ingesting a million fragments through the API would take hours (a detector pass per image);
the service at that size only needs what it reads, consistent with itself:

- **database rows**, bulk inserted (PostgreSQL ``COPY``, SQLite ``executemany``): artworks
  (one caption, three phrases, one annotation each), phrases and their links, regions and
  fragments. Every artwork has ``ROWS_PER_ARTWORK`` regions (the whole image and 36
  extracted boxes, as the detector keeps them) and one fragment per region, whose region
  set is what :func:`index.fragments.fragments_of` makes of those boxes.
- **a feature store** with those rows: random non-negative float16 features of the
  detector's ``D_raw``, under each artwork's image sha256, in a few large shards (as batch
  extraction writes them).
- **the two saved indexes** (fragments, phrases) over random unit vectors of the model's
  ``d`` under the database ids, of the kind the service would build at that size
  (:func:`index.vectors.plan_index`), with manifests naming the model version and the
  database state, so the service starts by loading them rather than rebuilding.

Only the vectors and the features are random: searches return arbitrary fragments, but every
statement, lock and file the service touches is the one it touches in a real collection.
"""

from __future__ import annotations

import hashlib
import io
import logging
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ROWS_PER_ARTWORK = 37  # whole image + top_k 36 extracted regions: the measured rows per image
TEMPLATES = 16  # different box layouts, cycled over the artworks
LINKS_PER_ARTWORK = 3  # phrases describing each artwork
CHUNK_ARTWORKS = 2048  # artworks generated, copied and appended to the store at a time
IMAGE_SIZE = (640, 480)
CREATED_AT = "2026-01-01 00:00:00+00"
WORDS = ("gold bird blue vase lotus flower scarab red figure stone seated statue jar canopic "
         "painted box dragon cloud wave star").split()


@dataclass(frozen=True)
class Filled:
    """What :func:`fill` made."""

    artworks: int
    fragments: int
    phrases: int
    store_rows: int
    index_kind: str
    seconds: dict[str, float]


@dataclass(frozen=True)
class Layout:
    """One artwork's regions and fragments (indices into its own rows)."""

    boxes: Any  # (ROWS_PER_ARTWORK, 4) float32
    scores: Any  # (ROWS_PER_ARTWORK,) float32
    kinds: Any  # (ROWS_PER_ARTWORK,) int8
    fragments: list[tuple[tuple[float, ...], str, list[int]]]  # box, source, region rows


def layouts(seed: int = 0) -> list[Layout]:
    """TEMPLATES box layouts: the whole image, then 36 boxes of random size and place."""
    import numpy as np

    from index.fragments import EXTRACTED, WHOLE, fragments_of

    rng = np.random.default_rng(seed)
    width, height = IMAGE_SIZE
    made = []
    for _ in range(TEMPLATES):
        n = ROWS_PER_ARTWORK - 1
        sizes = rng.uniform(0.1, 0.6, (n, 2)) * (width, height)
        corners = rng.uniform(0, 1, (n, 2)) * ((width, height) - sizes)
        boxes = np.vstack([[0, 0, width, height], np.hstack([corners, corners + sizes])]).astype(np.float32)
        scores = np.concatenate([[1.0], np.sort(rng.uniform(0.2, 1.0, n))[::-1]]).astype(np.float32)
        kinds = np.array([WHOLE] + [EXTRACTED] * n, dtype=np.int8)
        specs = fragments_of(boxes, scores, kinds)
        made.append(Layout(boxes.round(1), scores, kinds,
                           [(tuple(float(v) for v in s.box.round(1)), s.source, s.rows.tolist())
                            for s in specs]))
    return made


def artworks_for(fragments: int) -> int:
    """Artworks needed for at least ``fragments`` fragments (ROWS_PER_ARTWORK each)."""
    return max(1, -(-fragments // ROWS_PER_ARTWORK))


def image_sha256(artwork: int) -> str:
    """The (made-up) image hash of artwork number ``artwork``: its feature-store key."""
    return hashlib.sha256(f"fill-image-{artwork}".encode()).hexdigest()


def phrase_count(artworks: int) -> int:
    """Distinct phrases: about one new phrase per artwork, as museum catalogues have."""
    return max(LINKS_PER_ARTWORK * 4, artworks)


def phrase_text(number: int) -> str:
    """A distinct two- or three-word phrase for each number."""
    a, b, c = number % len(WORDS), (number // len(WORDS)) % len(WORDS), number // len(WORDS) ** 2
    return f"{WORDS[a]} {WORDS[b]} {c}"


# -- database rows ----------------------------------------------------------------------------

COLUMNS = {
    "artworks": ("id", "external_id", "title", "metadata", "image_location", "image_sha256",
                 "content_sha256", "width", "height", "created_at", "updated_at"),
    "captions": ("id", "artwork_id", "position", "text"),
    "phrases": ("id", "text", "created_at"),
    "artwork_phrases": ("artwork_id", "phrase_id"),
    "annotations": ("id", "artwork_id", "phrase_id", "x1", "y1", "x2", "y2", "source", "created_at"),
    "regions": ("id", "artwork_id", "store_row", "x1", "y1", "x2", "y2", "score", "kind"),
    "fragments": ("id", "artwork_id", "x1", "y1", "x2", "y2", "source", "region_rows"),
}
CLASSIFICATIONS = ("vase", "statue", "jar", "relief", "amulet")


def artwork_rows(first: int, last: int, shapes: list[Layout], phrases: int,
                 image_location: str) -> dict[str, list[tuple]]:
    """Every row of artworks ``first`` to ``last - 1`` (0-based; database ids are number + 1),
    by table. Artwork a owns store rows a·R … a·R + R - 1 and fragment ids a·R + 1 …"""
    width, height = IMAGE_SIZE
    rows: dict[str, list[tuple]] = {table: [] for table in COLUMNS if table != "phrases"}
    for a in range(first, last):
        artwork_id, base = a + 1, a * ROWS_PER_ARTWORK
        shape = shapes[a % len(shapes)]
        linked = sorted({(a * 7 + i * 131) % phrases + 1 for i in range(LINKS_PER_ARTWORK)})
        rows["artworks"].append((
            artwork_id, f"fill-{a:08d}", f"Filled artwork {a}",
            f'{{"source": "fill", "classification": "{CLASSIFICATIONS[a % len(CLASSIFICATIONS)]}"}}',
            image_location, image_sha256(a), hashlib.sha256(f"fill-content-{a}".encode()).hexdigest(),
            width, height, CREATED_AT, CREATED_AT))
        rows["captions"].append((artwork_id, artwork_id, 0, f"A {phrase_text(linked[0] - 1)}."))
        rows["artwork_phrases"] += [(artwork_id, p) for p in linked]
        x1, y1, x2, y2 = (float(v) for v in shape.boxes[1])
        rows["annotations"].append((artwork_id, artwork_id, linked[0], x1, y1, x2, y2,
                                    "ground_truth", CREATED_AT))
        for j in range(ROWS_PER_ARTWORK):
            x1, y1, x2, y2 = (float(v) for v in shape.boxes[j])
            rows["regions"].append((base + j + 1, artwork_id, base + j, x1, y1, x2, y2,
                                    float(shape.scores[j]), int(shape.kinds[j])))
        for j, (box, source, members) in enumerate(shape.fragments):
            region_rows = "[" + ",".join(str(base + m) for m in members) + "]"
            rows["fragments"].append((base + j + 1, artwork_id, *box, source, region_rows))
    return rows


def _copy_text(rows: list[tuple]) -> bytes:
    """PostgreSQL COPY text format (no value here holds a tab, newline or backslash)."""
    out = io.StringIO()
    for row in rows:
        out.write("\t".join("\\N" if v is None else str(v) for v in row))
        out.write("\n")
    return out.getvalue().encode("utf-8")


def _insert(connection: Any, table: str, rows: list[tuple]) -> None:
    """Bulk insert into ``table`` on a raw DB-API connection: COPY on PostgreSQL, else
    executemany (SQLite)."""
    columns = COLUMNS[table]
    cursor = connection.cursor()
    if hasattr(cursor, "copy"):  # psycopg 3
        with cursor.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
            copy.write(_copy_text(rows))
    else:
        marks = ", ".join("?" * len(columns))
        cursor.executemany(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})", rows)
    cursor.close()


def fill_database(database: Any, artworks: int, *, image_location: str, seed: int = 0) -> None:
    """Insert ``artworks`` artworks with everything they own into the empty, migrated
    ``database`` (a SQLAlchemy engine); ids continue from there (sequences set), and the
    planner's statistics are refreshed (ANALYZE)."""
    shapes = layouts(seed)
    phrases = phrase_count(artworks)
    raw = database.raw_connection()
    try:
        _insert(raw, "phrases", [(p + 1, phrase_text(p), CREATED_AT) for p in range(phrases)])
        for first in range(0, artworks, CHUNK_ARTWORKS):
            rows = artwork_rows(first, min(artworks, first + CHUNK_ARTWORKS), shapes, phrases,
                                image_location)
            for table in COLUMNS:  # parents first: the foreign keys hold at every step
                if table in rows:
                    _insert(raw, table, rows[table])
        raw.commit()
    finally:
        raw.close()
    with database.begin() as connection:
        if database.dialect.name == "postgresql":
            for table, columns in COLUMNS.items():
                if "id" in columns:  # explicit ids: move each sequence past them
                    connection.exec_driver_sql(
                        f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                        f"(SELECT max(id) FROM {table}))")
        connection.exec_driver_sql("ANALYZE")


# -- feature store and indexes ------------------------------------------------------------------


def fill_store(root: Path, artworks: int, *, dim: int, extractor: str, seed: int = 0) -> int:
    """Append every artwork's record (random features) to a new store at ``root``, in shards
    of CHUNK_ARTWORKS records; returns the rows written. Artwork a's rows start at a·R."""
    import numpy as np

    from index.featurestore import FeatureStore, RegionRecord

    shapes = layouts(seed)
    store = FeatureStore(root, dim=dim, extractor=extractor)
    if len(store):
        raise ValueError(f"{root}: the feature store is not empty; fill a new folder")
    rng = np.random.default_rng(seed)
    for first in range(0, artworks, CHUNK_ARTWORKS):
        count = min(artworks, first + CHUNK_ARTWORKS) - first
        features = np.abs(rng.standard_normal((count * ROWS_PER_ARTWORK, dim), dtype=np.float32))
        features = (features * 0.5).astype(np.float16)  # (count·R, D_raw)
        items = []
        for i in range(count):
            shape = shapes[(first + i) % len(shapes)]
            rows = features[i * ROWS_PER_ARTWORK:(i + 1) * ROWS_PER_ARTWORK]
            items.append((image_sha256(first + i), RegionRecord(shape.boxes, shape.scores, rows, shape.kinds)))
        placed = store.append_many(items)
        if placed[items[0][0]][0] != first * ROWS_PER_ARTWORK:
            raise RuntimeError("the feature store placed the records at unexpected rows")
    return len(store)


def manifest_states(session: Any) -> dict[str, dict[str, Any]]:
    """What each saved index's manifest records about the database it reflects, by index
    name: the one place that knows it. Today the position of the newest change in the index
    change log and when it was committed (:mod:`app.services.changes`); a filled database
    has an empty log, so position 0."""
    from app.services import changes
    from app.services.indexes import INDEXES

    position = changes.latest_position(session)
    state = {"log_position": position, "log_stamp": changes.stamp_of(session, position)}
    return {name: state for name in INDEXES}


def fill_indexes(database: Any, index_dir: Path, *, fragments: int, phrases: int, dim: int,
                 model_version: str, memory_budget: int, seed: int = 0) -> str:
    """Save a fragment index (ids 1..fragments) and a phrase index (ids 1..phrases) of random
    unit vectors, of the kinds the service would build, with manifests matching the
    database. Returns the fragment index's kind."""
    import numpy as np

    from app.db.session import session_factory
    from index.vectors import VectorIndex

    rng = np.random.default_rng(seed + 1)
    with session_factory(database)() as session:
        states = manifest_states(session)
    kind = ""
    for name, count in (("fragments", fragments), ("phrases", phrases)):
        vectors = rng.standard_normal((count, dim), dtype=np.float32)
        index = VectorIndex.build(np.arange(1, count + 1, dtype=np.int64), vectors, dim=dim,
                                  memory_budget=memory_budget, use_gpu=False, seed=seed)
        del vectors
        index.save(index_dir / name, model_version=model_version, state=states[name])
        kind = kind or index.kind
    return kind


def model_dims(scan: Path) -> tuple[int, int]:
    """(D_raw, d) of a SCAN checkpoint: the features it reads and the vectors it indexes."""
    from models.checkpoint import load_checkpoint
    from models.scan import CHECKPOINT_KIND, ScanConfig

    config = ScanConfig.from_dict(load_checkpoint(scan, kind=CHECKPOINT_KIND).config)
    return config.raw_dim, config.embed_dim


def fill(database: Any, data_dir: Path, *, fragments: int, scan: Path, detector: Path,
         memory_budget: int, seed: int = 0) -> Filled:
    """Everything above, for a service with ``data_dir`` and the migrated, empty ``database``
    (a SQLAlchemy engine), serving ``scan`` and ``detector``."""
    from models.checkpoint import file_sha256

    artworks = artworks_for(fragments)
    raw_dim, dim = model_dims(scan)
    image = data_dir / "images" / "fill.png"
    _write_image(image)
    seconds = {}
    started = time.perf_counter()
    fill_database(database, artworks, image_location=str(image), seed=seed)
    seconds["database"] = time.perf_counter() - started
    started = time.perf_counter()
    rows = fill_store(data_dir / "features", artworks, dim=raw_dim, extractor=file_sha256(detector),
                      seed=seed)
    seconds["store"] = time.perf_counter() - started
    started = time.perf_counter()
    total = artworks * ROWS_PER_ARTWORK
    kind = fill_indexes(database, data_dir / "index", fragments=total, phrases=phrase_count(artworks),
                        dim=dim, model_version=file_sha256(scan), memory_budget=memory_budget,
                        seed=seed)
    seconds["indexes"] = time.perf_counter() - started
    log.info("filled %d artworks, %d fragments (%s index) in %s", artworks, total, kind,
             ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()))
    return Filled(artworks, total, phrase_count(artworks), rows, kind,
                  {k: round(v, 2) for k, v in seconds.items()})


def _write_image(path: Path) -> None:
    """The one image file every filled artwork points at (thumbnails and crops work)."""
    from PIL import Image

    from index.atomic import write_atomic

    image = Image.new("RGB", IMAGE_SIZE, (180, 150, 110))
    write_atomic(path, lambda handle: image.save(handle, "PNG"))



@contextmanager
def scratch_database(postgres: str | None, folder: Path) -> Iterator[str]:
    """A new database migrated to head, its URL yielded, removed afterwards: on the PostgreSQL
    server of ``postgres`` (the URL of any database there) when given, else a SQLite file
    in ``folder``."""
    from sqlalchemy import create_engine

    from app.db.session import database_url, upgrade

    if postgres is None:
        path = folder / f"fill-{uuid.uuid4().hex[:8]}.db"
        try:
            yield upgrade(f"sqlite:///{path}")
        finally:
            for leftover in folder.glob(f"{path.name}*"):  # the WAL files too
                leftover.unlink()
        return
    admin = create_engine(database_url(postgres), isolation_level="AUTOCOMMIT")
    name = f"artalign_bench_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as connection:
            connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
        try:
            yield upgrade(admin.url.set(database=name).render_as_string(hide_password=False))
        finally:
            with admin.connect() as connection:
                connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        admin.dispose()
