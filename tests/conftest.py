"""Shared fixtures: real databases (PostgreSQL and SQLite, migrated with Alembic) and tiny
random checkpoints (region detector, SCAN) that any test can reuse.

PostgreSQL: the server at 127.0.0.1:5432 (user postgres, trust auth), or the server named by
``ARTALIGN_TEST_PG_URL`` (a URL of any database on it, e.g. ``postgresql://postgres@host/postgres``).
Each test gets a fresh, uniquely named database that is dropped afterwards.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

PG_SERVER_URL = os.environ.get(
    "ARTALIGN_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
DATA_DIR = Path(__file__).resolve().parents[2] / "shared/data/egyptian-cc0"


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny models gain nothing from intra-op threads, and on a shared CI machine the
    threads fight each other: one thread is several times faster there, and deterministic.
    Set for every test module (a command under test may change it) and restored after."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _pg_admin_engine():  # noqa: ANN202 (sqlalchemy imported lazily)
    from sqlalchemy import create_engine

    from app.db.session import database_url

    # CREATE/DROP DATABASE cannot run inside a transaction.
    return create_engine(database_url(PG_SERVER_URL), isolation_level="AUTOCOMMIT")


@contextmanager
def migrated_pg_database(prefix: str, *, template: str | None = None) -> Iterator[str]:
    """A new, uniquely named PostgreSQL database at the newest migration; its URL is yielded
    and the database is dropped afterwards. ``template`` copies an already migrated database
    (CREATE DATABASE … TEMPLATE is much faster than running every migration again); the
    upgrade is then a no-op that checks the copy is where the migrations say. Skips the test
    when the server is not reachable."""
    from sqlalchemy.exc import OperationalError

    from app.db.session import upgrade

    admin = _pg_admin_engine()
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    copy = f' TEMPLATE "{template}"' if template else ""
    try:
        with admin.connect() as connection:
            connection.exec_driver_sql(f'CREATE DATABASE "{name}"{copy}')
    except OperationalError as exc:
        admin.dispose()
        pytest.skip(f"PostgreSQL at {PG_SERVER_URL} is not reachable ({exc.orig})")
    url = admin.url.set(database=name).render_as_string(hide_password=False)
    try:
        upgrade(url)
        yield url
    finally:
        with admin.connect() as connection:
            connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


@pytest.fixture(scope="session")
def _pg_template() -> Iterator[str]:
    """The name of a database migrated once per test session; each test's database copies it."""
    from sqlalchemy.engine import make_url

    with migrated_pg_database("artalign_template") as url:
        yield make_url(url).database


@pytest.fixture
def pg_url(_pg_template: str) -> Iterator[str]:
    """A fresh, uniquely named PostgreSQL database at the newest migration; dropped after."""
    with migrated_pg_database("artalign_test", template=_pg_template) as url:
        yield url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A fresh SQLite database file, migrated to head."""
    from app.db.session import upgrade

    return upgrade(f"sqlite:///{tmp_path / 'artalign.db'}")


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> str:
    """Each test that uses it runs twice: on SQLite and on PostgreSQL."""
    return request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")


@pytest.fixture
def db_session(db_url: str) -> Iterator:
    from app.db.session import create_db_engine, session_factory

    engine = create_db_engine(db_url)
    with session_factory(engine)() as session:
        yield session
    engine.dispose()


@pytest.fixture(scope="session")
def egyptian_dir() -> Path:
    if not (DATA_DIR / "metadata.csv").is_file():
        pytest.skip(f"the real data set is not at {DATA_DIR}")
    return DATA_DIR


# -- tiny random checkpoints ---------------------------------------------------------------

TINY_WORDS = ("blue vase gold bird birds two cloud clouds dragon among red cat head ears "
              "standing statue painted box of with a the and figure stone green lotus").split()


TINY_ATTRIBUTES = ("gold", "bird", "red", "blue")  # the tiny detector's attribute head


@dataclass(frozen=True)
class TinyCheckpoints:
    detector: Path  # a randomly initialised compact-FPN Faster R-CNN, D_raw = 32
    scan: Path  # a randomly initialised SCAN (d = 16) over TINY_WORDS, raw_dim = 32
    other_scan: Path  # another SCAN with different weights: another model version


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> TinyCheckpoints:
    """Small enough to run every test on the CPU in milliseconds; random, so scores mean
    nothing, but every code path (shapes, padding, ranking) runs for real."""
    import torch

    from models.checkpoint import save_checkpoint
    from models.regions import DetectorConfig, build_detector
    from models.scan import SCAN, ScanConfig
    from models.vocab import SPECIALS, Vocabulary

    folder = tmp_path_factory.mktemp("checkpoints")
    torch.manual_seed(0)
    detector_config = DetectorConfig(
        image_size=64, top_k=6, min_k=3, proposals=20, representation_size=32,
        fpn_channels=16, box_batch_size_per_image=16, attribute_names=list(TINY_ATTRIBUTES),
    )
    save_checkpoint(folder / "detector.pt", kind="detector", config=detector_config.to_dict(),
                    state_dict=build_detector(detector_config).state_dict())
    vocab = Vocabulary([*SPECIALS, *dict.fromkeys(TINY_WORDS)])
    scan_config = ScanConfig(vocab_size=len(vocab), raw_dim=32, embed_dim=16, word_dim=8)
    SCAN(scan_config).save(folder / "scan.pt", vocab)
    SCAN(scan_config).save(folder / "other-scan.pt", vocab)
    return TinyCheckpoints(folder / "detector.pt", folder / "scan.pt", folder / "other-scan.pt")


@pytest.fixture(scope="session")
def tiny_extractor(tiny_checkpoints: TinyCheckpoints):  # noqa: ANN201 (torch imported lazily)
    from models.regions import RegionExtractor

    return RegionExtractor.from_checkpoint(tiny_checkpoints.detector)


@contextmanager
def deletes_sent(session) -> Iterator[list[int]]:  # noqa: ANN001 (sqlalchemy imported lazily)
    """The DELETE statements ``session``'s engine sends inside the block: one item each, the
    number of parameter sets it carries (an executemany carries one per row)."""
    from sqlalchemy import event

    sent: list[int] = []

    def on_execute(conn, cursor, statement, parameters, context, executemany):  # noqa: ANN001
        if statement.lstrip().upper().startswith("DELETE"):
            sent.append(len(parameters) if executemany else 1)

    bind = session.get_bind()
    event.listen(bind, "before_cursor_execute", on_execute)
    try:
        yield sent
    finally:
        event.remove(bind, "before_cursor_execute", on_execute)


def image_bytes(seed: int, size: tuple[int, int] = (64, 48), fmt: str = "PNG") -> bytes:
    """A small generated image: coloured rectangles on noise, different for every seed."""
    import io

    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x, y = rng.integers(0, size[0] // 2), rng.integers(0, size[1] // 2)
        draw.rectangle([x, y, x + size[0] // 3, y + size[1] // 3],
                       fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()
