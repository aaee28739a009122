"""The index change log: every write appends its change in its own transaction; indexes
catch up with what other processes committed, a start replays the log past a snapshot, and
no upload writes index files (snapshots do, off the request path)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, select

from app.db.models import Fragment, IndexBuild, IndexChangeRow, Phrase
from app.db.session import create_db_engine, session_factory
from app.services import changes
from app.services.indexes import Indexes
from app.services.ingest import delete_artwork, ingest_artwork
from index.featurestore import FeatureStore
from models.encoder import Encoder
from models.scan import load_scan
from tests.conftest import deletes_sent, image_bytes
from tests.test_api import WRITE, artwork_form, make_settings, pg_database, start


def make_indexes(checkpoints, extractor, data_dir: Path, **options) -> Indexes:
    """Indexes as another process would open them: their own feature-store handle."""
    model, vocab, checkpoint = load_scan(checkpoints.scan)
    return Indexes(encoder=Encoder(model, vocab), model_version=checkpoint.sha256,
                   store=FeatureStore(data_dir / "features", extractor=extractor.version),
                   index_dir=data_dir / "index", **options)


def ingest(session, indexes, extractor, data_dir, external_id, seed, caption="A blue vase.",
           store=None):
    return ingest_artwork(session, extractor=extractor, store=store if store is not None else indexes.store,
                          indexes=indexes,
                          external_id=external_id, image_bytes=image_bytes(seed), title=external_id,
                          captions=[caption], image_dir=data_dir / "images")


def database_ids(session) -> dict[str, np.ndarray]:
    ids = {"fragments": np.array(session.scalars(select(Fragment.id).order_by(Fragment.id)).all()),
           "phrases": np.array(session.scalars(select(Phrase.id).order_by(Phrase.id)).all())}
    session.rollback()
    return ids


def assert_agree(session, indexes: Indexes) -> None:
    """The indexes hold exactly the database's fragment and phrase ids."""
    for name, ids in database_ids(session).items():
        assert np.array_equal(indexes[name].ids(), ids), name


@pytest.fixture
def sessions(db_url):
    database = create_db_engine(db_url)
    yield session_factory(database)
    database.dispose()


def test_a_replica_catches_up_with_what_another_process_committed(
        sessions, tiny_checkpoints, tiny_extractor, tmp_path):
    writer = make_indexes(tiny_checkpoints, tiny_extractor, tmp_path)
    replica = make_indexes(tiny_checkpoints, tiny_extractor, tmp_path, snapshots=False)
    with sessions() as session, sessions() as other:
        writer.start(session)
        replica.start(other)
        for number in range(3):
            ingest(session, writer, tiny_extractor, tmp_path, f"a-{number}", 10 + number,
                   f"A red dragon number {number}.")
        assert_agree(session, writer)  # the writer applied its own changes after each commit
        assert replica.fragment_count() == 0
        lag = replica.lag(other)
        assert (lag.applied, lag.latest, lag.changes) == (0, writer.position, 3)
        assert lag.seconds >= 0

        assert replica.catch_up(other) == 3  # its feature store re-reads the writer's rows
        assert_agree(other, replica)
        assert replica.lag(other) == changes.Lag(writer.position, writer.position, 0, 0.0)
        assert replica.catch_up(other) == 0

        delete_artwork(session, external_id="a-1", indexes=writer)
        ingest(session, writer, tiny_extractor, tmp_path, "a-2", 99, "A green cat.")  # replaced
        assert replica.catch_up(other) == 2
        assert_agree(other, replica)
        assert_agree(session, writer)
    assert not replica.save_snapshot()  # a replica that shares the folder never writes it


def test_lag_is_measured_on_the_database_clock_whatever_the_writer_host_thinks(
        pg_url, tiny_checkpoints, tiny_extractor, tmp_path, monkeypatch):
    """Writers and replicas on several hosts share one PostgreSQL server: the log's stamps and
    the lag are read off the server's clock, so a writer whose clock is an hour slow does not
    make every replica report an hour of lag."""
    from datetime import datetime, timedelta

    class SlowClock(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime.now(tz) - timedelta(hours=1)

    database = create_db_engine(pg_url)
    sessions = session_factory(database)
    writer = make_indexes(tiny_checkpoints, tiny_extractor, tmp_path)
    replica = make_indexes(tiny_checkpoints, tiny_extractor, tmp_path, snapshots=False)
    with sessions() as session, sessions() as other:
        writer.start(session)
        replica.start(other)
        with monkeypatch.context() as clock:
            clock.setattr(changes, "datetime", SlowClock)  # the writer's host
            ingest(session, writer, tiny_extractor, tmp_path, "a-0", 10)
        lag = replica.lag(other)
        assert lag.changes == 1
        assert 0 <= lag.seconds < 60
        stamp = changes.read_changes(other, 0, 1)[0].created_at
        assert abs((stamp - datetime.now(stamp.tzinfo)).total_seconds()) < 60
    database.dispose()


def test_a_replay_with_an_artwork_added_and_deleted_leaves_no_trace(
        sessions, tiny_checkpoints, tiny_extractor, tmp_path):
    first = make_indexes(tiny_checkpoints, tiny_extractor, tmp_path)
    with sessions() as session:
        first.start(session)
        assert not first.save_snapshot()  # the start's rebuild saved one, at position 0
        # Written by a process that updates no index (as `artalign ingest --no-index`).
        for external_id, seed, caption in (("gone", 20, "A stone statue."),
                                           ("gone", 21, "A lotus box."),  # replaced
                                           ("kept", 22, "A stone statue.")):
            ingest(session, None, tiny_extractor, tmp_path, external_id, seed, caption,
                   store=first.store)
            if external_id == "gone":
                gone = database_ids(session)
        assert delete_artwork(session, external_id="gone")
        log = session.scalars(select(IndexChangeRow).order_by(IndexChangeRow.id)).all()
        assert len(log) == 4 and log[-1].removed_fragments == gone["fragments"].tolist()
        session.rollback()

        offline = make_indexes(tiny_checkpoints, tiny_extractor, tmp_path, snapshots=False)
        assert offline.start(session) == {"fragments": "loaded", "phrases": "loaded"}
        assert offline.position == log[-1].id
        assert_agree(session, offline)
        assert not set(gone["fragments"]) & set(offline["fragments"].ids())
        assert offline.catch_up(session) == 0


def test_coalesce_drops_every_named_id_and_adds_back_the_added_ones():
    entries = [changes.LogEntry(1, None, changes.IndexChange([1, 2], [], [7], [])),
               changes.LogEntry(2, None, changes.IndexChange([3], [1, 2], [], [7])),
               changes.LogEntry(3, None, changes.IndexChange([], [], [8], [5]))]
    folded = changes.coalesce(entries)
    assert folded == changes.Coalesced(removed_fragments=[1, 2, 3], added_fragments=[1, 2, 3],
                                       removed_phrases=[5, 7, 8], added_phrases=[7, 8])
    assert not changes.IndexChange() and changes.IndexChange(removed_phrases=[1])


@pytest.mark.postgres
def test_uploads_write_no_index_files_until_a_snapshot(tiny_checkpoints, tmp_path):
    """The request path touches no index file; the snapshot thread (here: at shutdown, the
    interval being an hour) saves them with the log position they reflect."""
    from index.vectors import read_manifest

    index_dir = tmp_path / "index"
    with pg_database() as url:
        client = start(make_settings(url, tmp_path, tiny_checkpoints.scan, tiny_checkpoints.detector,
                                     index_snapshot_seconds=3600, index_sync_seconds=0))
        try:
            before = {path: path.stat().st_mtime_ns for path in index_dir.rglob("*")}
            assert read_manifest(index_dir / "fragments")["state"]["log_position"] == 0
            for number in range(3):
                response = client.post("/artworks", headers=WRITE,
                                       **artwork_form(f"quiet-{number}", seed=80 + number))
                assert response.status_code == 201, response.text
            assert client.delete("/artworks/external/quiet-0", headers=WRITE).status_code == 200
            after = {path: path.stat().st_mtime_ns for path in index_dir.rglob("*")}
            assert after == before
            state = client.get("/readyz").json()["index"]
            assert state["position"] == state["latest_position"] == 4
            assert state["lag_changes"] == 0 and state["lag_seconds"] == 0
        finally:
            client.__exit__(None, None, None)
        for name in ("fragments", "phrases"):
            assert read_manifest(index_dir / name)["state"]["log_position"] == 4


@pytest.mark.postgres
def test_log_rows_commit_in_id_order_on_postgresql(pg_url):
    """A second writer's log row waits for the first writer's commit (the advisory lock), so
    its id is larger and it commits later: a reader at position p never skips a row."""
    import threading

    database = create_db_engine(pg_url)
    sessions = session_factory(database)
    with sessions() as first, sessions() as second:
        changes.record_change(first, changes.IndexChange(added_fragments=[1]))
        waiter = threading.Thread(target=lambda: (
            changes.record_change(second, changes.IndexChange(added_fragments=[2])), second.commit()))
        waiter.start()
        waiter.join(0.5)
        assert waiter.is_alive()  # blocked behind the first, uncommitted writer
        first.commit()
        waiter.join(10)
        assert not waiter.is_alive()
        rows = first.execute(select(IndexChangeRow.id, IndexChangeRow.added_fragments)
                             .order_by(IndexChangeRow.id)).all()
        assert [r.added_fragments for r in rows] == [[1], [2]]
    database.dispose()


def test_prune_deletes_only_the_rows_up_to_before_and_records_the_horizon(sessions):
    with sessions() as session:
        assert changes.pruned_through(session) == 0
        for number in range(5):
            changes.record_change(session, changes.IndexChange(added_fragments=[number]))
            session.commit()
        ids = session.scalars(select(IndexChangeRow.id).order_by(IndexChangeRow.id)).all()
        assert changes.prune(session, ids[2]) == 3
        assert session.scalars(select(IndexChangeRow.id).order_by(IndexChangeRow.id)).all() == ids[3:]
        assert changes.pruned_through(session) == ids[2]
        assert changes.prune(session, ids[1]) == 0  # the horizon never goes down
        assert changes.pruned_through(session) == ids[2]
        # A gap in the ids (a rolled-back transaction) is no pruning; a read past the horizon is.
        entries = changes.read_changes(session, ids[3], 10)  # as if row ids[3] had rolled back
        assert changes.pruned_past(session, ids[2], entries) == 0
        assert changes.pruned_past(session, ids[0], entries) == ids[2]
        assert changes.pruned_past(session, ids[-1], []) == 0
        # In chunks, each its own transaction: two rows one at a time are three DELETEs.
        with deletes_sent(session) as deletes:
            assert changes.prune(session, ids[4], chunk=1) == 2
        assert len(deletes) == 3 and changes.pruned_through(session) == ids[4]
        assert session.scalars(select(IndexChangeRow.id)).all() == []


def index_builds(session) -> int:
    count = session.scalar(select(func.count()).select_from(IndexBuild))
    session.rollback()
    return count


def test_an_index_behind_the_pruned_horizon_rebuilds_and_one_ahead_catches_up(
        sessions, tiny_checkpoints, tiny_extractor, tmp_path, caplog):
    writer = make_indexes(tiny_checkpoints, tiny_extractor, tmp_path)
    behind = make_indexes(tiny_checkpoints, tiny_extractor, tmp_path, snapshots=False)
    ahead = make_indexes(tiny_checkpoints, tiny_extractor, tmp_path, snapshots=False)
    with sessions() as session, sessions() as other:
        writer.start(session)
        behind.start(other)
        ahead.start(other)
        for number in range(2):
            ingest(session, writer, tiny_extractor, tmp_path, f"p-{number}", 30 + number,
                   f"A carved lion number {number}.")
        assert ahead.catch_up(other) == 2
        horizon = ahead.position
        ingest(session, writer, tiny_extractor, tmp_path, "p-2", 32, "A gilded mask.")
        delete_artwork(session, external_id="p-0", indexes=writer)
        assert changes.prune(session, horizon) == 2
        builds = index_builds(session)

        assert ahead.catch_up(other) == 2  # nothing it needs was pruned: a plain replay
        assert_agree(other, ahead)
        assert index_builds(other) == builds
        assert "pruned" not in caplog.text

        assert behind.catch_up(other) == 0  # what it missed is gone: it rebuilds
        assert f"at log position 0 but the log was pruned through {horizon}" in caplog.text
        assert index_builds(other) == builds + 1
        assert_agree(other, behind)
        assert behind.position == writer.position
        assert behind.catch_up(other) == 0 and index_builds(other) == builds + 1

        # Every row pruned: a start from the old snapshot (position 0) rebuilds once, and
        # then stands at the horizon though no row is left.
        assert changes.prune(session, writer.position) == 2
        late = make_indexes(tiny_checkpoints, tiny_extractor, tmp_path, snapshots=False)
        late.start(other)
        assert late.position == writer.position
        assert_agree(other, late)
        assert late.catch_up(other) == 0 and index_builds(other) == builds + 2


def test_the_service_prunes_the_log_behind_its_snapshots(db_url, tiny_checkpoints, tmp_path):
    """With ``index_log_keep`` 1, a snapshot at position p deletes the rows up to p - 1."""
    import time

    database = create_db_engine(db_url)
    sessions = session_factory(database)
    client = start(make_settings(db_url, tmp_path, tiny_checkpoints.scan, tiny_checkpoints.detector,
                                 index_snapshot_seconds=3600, index_snapshot_changes=2,
                                 index_log_keep=1, index_sync_seconds=0))
    try:
        for number in range(3):
            response = client.post("/artworks", headers=WRITE,
                                   **artwork_form(f"pruned-{number}", seed=90 + number))
            assert response.status_code == 201, response.text
        deadline = time.monotonic() + 30
        with sessions() as session:
            while not (horizon := changes.pruned_through(session)) and time.monotonic() < deadline:
                session.rollback()
                time.sleep(0.1)
            ids = session.scalars(select(IndexChangeRow.id).order_by(IndexChangeRow.id)).all()
        assert horizon >= 1  # the snapshot after two uploads (or three) is at horizon + 1
        assert ids == list(range(horizon + 1, 4))
        assert client.get("/readyz").json()["index"]["position"] == 3
    finally:
        client.__exit__(None, None, None)
        database.dispose()
