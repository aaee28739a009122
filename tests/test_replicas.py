"""Real processes over one PostgreSQL database: a replica keeps up with a writer under a
burst of uploads, and a writer killed (SIGKILL) during a burst restarts with the database,
the feature store and the indexes agreeing.

Each service is `artalign serve` in its own process, with the tiny checkpoints; uploads are
real HTTP. ``ARTALIGN_TEST_BURST_SECONDS`` (default 60, what the issue asks) shortens the
replica burst for a quick local run.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from sqlalchemy import func, select

from app.db.models import Fragment, Phrase
from app.db.session import create_db_engine, session_factory
from tests import browser
from tests.browser import Service, free_port, stop_service
from tests.conftest import TinyCheckpoints, image_bytes, migrated_pg_database
from tests.test_api import KEY, WRITE

pytestmark = pytest.mark.postgres

BURST_SECONDS = float(os.environ.get("ARTALIGN_TEST_BURST_SECONDS", "60"))
CRASH_AFTER_SECONDS = 8.0
SYNC_SECONDS = 1.0
SNAPSHOT_SECONDS = 5.0
SLACK_SECONDS = 2.0  # a catch-up's own time and a /readyz round trip on a busy machine
CLIENTS = 2


def serve(url: str, data_dir: Path, checkpoints: TinyCheckpoints, log_path: Path, **settings) -> Service:
    """`artalign serve` on a free port with these settings, once /readyz answers."""
    env = {
        **os.environ, "ARTALIGN_DATABASE_URL": url, "ARTALIGN_DATA_DIR": str(data_dir),
        "ARTALIGN_SCAN_CHECKPOINT": str(checkpoints.scan),
        "ARTALIGN_DETECTOR_CHECKPOINT": str(checkpoints.detector),
        "ARTALIGN_API_KEYS": json.dumps([KEY]), "ARTALIGN_DEVICE": "cpu",
        "ARTALIGN_LIMITS__TORCH_THREADS": "1", "ARTALIGN_LIMITS__INFERENCE_THREADS": "2",
        **{f"ARTALIGN_{name.upper()}": str(value) for name, value in settings.items()},
    }
    return browser.serve(env, port=free_port(), api_key=KEY, collection=data_dir, log_path=log_path)


class Uploads:
    """``CLIENTS`` threads uploading new artworks to ``url`` until stopped; every fifth
    request replaces an earlier artwork and every seventh deletes one. Each caption names
    its own maker: phrases are added, and dropped with the last artwork naming them."""

    def __init__(self, url: str, seed: int) -> None:
        self.url, self.seed = url, seed
        self.stop = threading.Event()
        self.done = 0
        self.errors: list[str] = []  # unexpected answers (a thread's assert would go unseen)
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(n,), daemon=True) for n in range(CLIENTS)]

    def __enter__(self) -> Uploads:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join()

    def _run(self, client_number: int) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as client:
            count = 0
            while not self.stop.is_set():
                count += 1
                name = f"c{client_number}-{count}"
                try:
                    self._request(client, client_number, count, name)
                except httpx.TransportError:  # the service was killed: stop
                    return
                except AssertionError as exc:
                    self.errors.append(str(exc))
                    return
                with self._lock:
                    self.done += 1

    def _request(self, client: httpx.Client, client_number: int, count: int, name: str) -> None:
        if count % 7 == 0:
            response = client.delete(f"/artworks/external/c{client_number}-{count - 3}", headers=WRITE)
            assert response.status_code in (200, 404), response.text
            return
        if count % 5 == 0:
            name = f"c{client_number}-{count - 1}"  # replaced with another image and caption
        maker = "".join(chr(ord("a") + int(digit)) for digit in f"{client_number}{count}")
        document = {"external_id": name, "title": name, "captions": [  # phrases come and go
            f"A {('blue', 'red', 'green')[count % 3]} vase with gold birds by master {maker}."]}
        seed = self.seed + client_number * 100_000 + count
        response = client.post("/artworks", headers=WRITE, data={"artwork": json.dumps(document)},
                               files={"image": (f"{name}.png", image_bytes(seed), "image/png")})
        assert response.status_code in (200, 201), response.text


def index_state(service: Service) -> dict:
    return service.get_json("/readyz")["index"]


def database_counts(url: str) -> tuple[int, int]:
    database = create_db_engine(url)
    with session_factory(database)() as session:
        counts = (session.scalar(select(func.count()).select_from(Fragment)),
                  session.scalar(select(func.count()).select_from(Phrase)))
    database.dispose()
    return counts


@pytest.fixture
def pg_url() -> Iterator[str]:
    with migrated_pg_database("artalign_replicas") as url:
        yield url


def test_a_replica_under_a_burst_of_uploads_stays_within_one_snapshot_interval(
        pg_url: str, tiny_checkpoints: TinyCheckpoints, tmp_path: Path) -> None:
    """Writer and replica share one data folder (feature store and index snapshots); only
    the writer saves snapshots."""
    data, log = tmp_path / "var", tmp_path / "services.log"
    timing = {"index_sync_seconds": SYNC_SECONDS, "index_snapshot_seconds": SNAPSHOT_SECONDS}
    writer = serve(pg_url, data, tiny_checkpoints, log, **timing)
    replica = serve(pg_url, data, tiny_checkpoints, log, index_snapshots="false", **timing)
    lags: list[float] = []
    try:
        with Uploads(writer.url, seed=1000) as uploads:
            deadline = time.monotonic() + BURST_SECONDS
            while time.monotonic() < deadline:
                lags.append(index_state(replica)["lag_seconds"])
                time.sleep(0.25)
        assert uploads.done > 10 and not uploads.errors, (uploads.errors, log.read_text()[-3000:])
        bound = SNAPSHOT_SECONDS + SYNC_SECONDS + SLACK_SECONDS
        assert max(lags) <= bound, (max(lags), sorted(lags)[-5:])
        assert any(lag > 0 for lag in lags)  # it was measured behind at times: the probe works

        deadline = time.monotonic() + 30
        while (state := index_state(replica))["lag_changes"]:
            assert time.monotonic() < deadline, state
            time.sleep(0.2)
        fragments, phrases = database_counts(pg_url)
        assert (state["fragments"], state["phrases"]) == (fragments, phrases)
        assert state["position"] == state["latest_position"] == index_state(writer)["position"]
        manifest = json.loads((data / "index" / "fragments" / "manifest.json").read_text())
        assert manifest["state"]["log_position"] > 0  # the writer snapshotted during the burst
    finally:
        for service in (replica, writer):
            stop_service(service)


def test_a_writer_killed_during_uploads_restarts_consistent(
        pg_url: str, tiny_checkpoints: TinyCheckpoints, tmp_path: Path) -> None:
    """SIGKILL at any point of a burst (snapshots every few changes, so often mid-write);
    the database, the feature store and the indexes agree after a restart."""
    from app.services.indexes import Indexes
    from index.featurestore import FeatureStore
    from models.encoder import Encoder
    from models.scan import load_scan

    data, log = tmp_path / "var", tmp_path / "services.log"
    often = {"index_snapshot_changes": 5, "index_snapshot_seconds": 1}
    writer = serve(pg_url, data, tiny_checkpoints, log, **often)
    with Uploads(writer.url, seed=5000) as uploads:
        time.sleep(CRASH_AFTER_SECONDS)
        writer.process.send_signal(signal.SIGKILL)
        writer.process.wait()
    assert uploads.done > 5 and not uploads.errors, uploads.errors

    # What a start sees: the snapshot the writer left, and the log past it.
    model, vocab, checkpoint = load_scan(tiny_checkpoints.scan)
    store = FeatureStore(data / "features")
    indexes = Indexes(encoder=Encoder(model, vocab), model_version=checkpoint.sha256, store=store,
                      index_dir=data / "index", snapshots=False)
    database = create_db_engine(pg_url)
    with session_factory(database)() as session:
        indexes.start(session)
        fragments = session.execute(select(Fragment.id, Fragment.region_rows).order_by(Fragment.id)).all()
        phrase_ids = session.scalars(select(Phrase.id).order_by(Phrase.id)).all()
    database.dispose()
    assert np.array_equal(indexes["fragments"].ids(), [f.id for f in fragments])
    assert np.array_equal(indexes["phrases"].ids(), phrase_ids)
    assert max(max(f.region_rows) for f in fragments) < len(store)

    restarted = serve(pg_url, data, tiny_checkpoints, log, **often)
    try:
        state = index_state(restarted)
        assert (state["fragments"], state["phrases"]) == (len(fragments), len(phrase_ids))
        assert state["lag_changes"] == 0
    finally:
        stop_service(restarted)
