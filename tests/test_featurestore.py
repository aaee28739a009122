"""The feature store: round trip, global rows, float16 storage, atomic appends, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from index import featurestore
from index.featurestore import FeatureStore, FeatureStoreError, RegionRecord

DIM = 6


def make_record(n: int, seed: int, dim: int = DIM) -> RegionRecord:
    rng = np.random.default_rng(seed)
    corners = rng.uniform(0, 100, size=(n, 2))
    sizes = rng.uniform(1, 50, size=(n, 2))
    return RegionRecord(
        boxes=np.concatenate([corners, corners + sizes], axis=1),
        scores=rng.uniform(0, 1, size=n),
        features=rng.normal(0, 3, size=(n, dim)),
        kinds=np.array([0] + [1] * (n - 1)),
    )


def test_round_trip_across_shards_and_reopen(tmp_path):
    store = FeatureStore(tmp_path / "fs", extractor="abc123")
    assert len(store) == 0 and store.keys() == [] and store.dim is None
    first = {"a": make_record(3, 1), "b": make_record(5, 2)}
    second = {"c": make_record(1, 3)}
    spans = store.append_many(first.items())
    assert spans == {"a": (0, 3), "b": (3, 5)}
    assert store.append("c", second["c"]) == (8, 1)

    reopened = FeatureStore(tmp_path / "fs")
    assert len(reopened) == 9 and reopened.dim == DIM and reopened.extractor == "abc123"
    assert reopened.keys() == ["a", "b", "c"]
    assert reopened.has("b") and not reopened.has("z")
    for key, record in {**first, **second}.items():
        got = reopened.get(key)
        np.testing.assert_array_equal(got.boxes, record.boxes.astype(np.float32))
        np.testing.assert_array_equal(got.scores, record.scores.astype(np.float32))
        np.testing.assert_array_equal(got.kinds, record.kinds)
        assert got.boxes.dtype == np.float32 and got.kinds.dtype == np.int8
        # features come back as a float16 memory-mapped view, equal to the float16 rounding
        assert got.features.dtype == np.float16
        assert isinstance(got.features.base, np.memmap) or isinstance(got.features, np.memmap)
        np.testing.assert_array_equal(got.features, record.features.astype(np.float16))


def test_float16_storage_is_close_and_half_the_size(tmp_path):
    record = make_record(40, 4, dim=64)
    store = FeatureStore(tmp_path)
    store.append("k", record)
    stored = np.load(tmp_path / "shard-000000" / "features.npy")
    assert stored.dtype == np.float16 and stored.shape == (40, 64)
    np.testing.assert_allclose(store.get("k").features.astype(np.float32), record.features, rtol=1e-3, atol=1e-3)
    with pytest.raises(FeatureStoreError, match="float16"):
        store.append("huge", RegionRecord(
            boxes=np.zeros((1, 4)), scores=[1.0], features=np.full((1, 64), 1e6), kinds=[0]))


def test_global_rows_map_to_the_right_features_in_any_order(tmp_path):
    store = FeatureStore(tmp_path)
    records = {f"k{i}": make_record(i + 1, i) for i in range(4)}
    for key, record in records.items():  # four shards
        store.append(key, record)
    everything = np.concatenate([r.features.astype(np.float16) for r in records.values()]).astype(np.float32)
    rows = np.array([9, 0, 3, 3, 8, 1])
    got = store.features(rows)
    assert got.dtype == np.float32 and got.shape == (6, DIM)
    np.testing.assert_array_equal(got, everything[rows])
    start, count = store.rows_of("k2")
    np.testing.assert_array_equal(store.features(np.arange(start, start + count)), store.get("k2").features.astype(np.float32))
    with pytest.raises(IndexError, match="out of range"):
        store.features(np.array([len(store)]))


def test_present_or_repeated_key_and_dim_mismatch_are_refused_before_writing(tmp_path):
    store = FeatureStore(tmp_path, extractor="sha-of-detector-1")
    store.append("a", make_record(2, 1))
    with pytest.raises(FeatureStoreError, match="'a' is already in"):
        store.append_many([("b", make_record(1, 2)), ("a", make_record(1, 3))])
    with pytest.raises(FeatureStoreError, match="appears twice"):
        store.append_many([("c", make_record(1, 2)), ("c", make_record(1, 3))])
    with pytest.raises(FeatureStoreError, match="dim 9.*holds dim 6"):
        store.append("d", make_record(1, 2, dim=9))
    assert store.keys() == ["a"] and not (tmp_path / "shard-000001").exists()
    with pytest.raises(FeatureStoreError, match="dim 6, expected 8"):
        FeatureStore(tmp_path, dim=8)
    with pytest.raises(FeatureStoreError, match="written by region extractor sha-of-detec"):
        FeatureStore(tmp_path, extractor="sha-of-detector-2")
    assert FeatureStore(tmp_path, extractor="sha-of-detector-1").keys() == ["a"]


def test_crash_between_shard_rename_and_its_log_line_leaves_old_state_and_rerun_completes(
        tmp_path, monkeypatch):
    store = FeatureStore(tmp_path)
    store.append("a", make_record(2, 1))
    manifest_before = (tmp_path / "manifest.json").read_text()

    def crash(path, line):
        with open(path, "a") as handle:
            handle.write(line[:10])  # half a line, then the power goes
        raise OSError("simulated power cut")

    monkeypatch.setattr(featurestore, "append_line", crash)
    with pytest.raises(OSError, match="power cut"):
        store.append_many([("b", make_record(3, 2)), ("c", make_record(1, 3))])
    monkeypatch.undo()
    assert (tmp_path / "shard-000001").is_dir()  # the shard was renamed into place
    assert (tmp_path / "manifest.json").read_text() == manifest_before
    assert not (tmp_path / "manifest.log").read_text().endswith("\n")  # the cut line is there

    after_crash = FeatureStore(tmp_path)
    assert after_crash.keys() == ["a"] and len(after_crash) == 2
    np.testing.assert_array_equal(after_crash.get("a").kinds, [0, 1])

    todo = [(k, r) for k, r in [("a", None), ("b", make_record(3, 2)), ("c", make_record(1, 3))]
            if not after_crash.has(k)]
    assert after_crash.append_many(todo) == {"b": (2, 3), "c": (5, 1)}
    final = FeatureStore(tmp_path)
    assert final.keys() == ["a", "b", "c"] and len(final) == 6
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
        "manifest.json", "manifest.log", "shard-000000", "shard-000001"]


def test_crash_while_writing_the_shard_leaves_only_a_hidden_temp_folder(tmp_path, monkeypatch):
    store = FeatureStore(tmp_path)
    store.append("a", make_record(2, 1))
    real_save = np.save
    calls = []

    def failing_save(handle, array):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        real_save(handle, array)

    monkeypatch.setattr(featurestore.np, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        store.append("b", make_record(2, 2))
    monkeypatch.undo()
    assert not (tmp_path / "shard-000001").exists()
    assert FeatureStore(tmp_path).keys() == ["a"]
    store = FeatureStore(tmp_path)
    store.append("b", make_record(2, 2))
    assert not list(tmp_path.glob(".tmp-shard-*"))  # stale temp folders are cleaned up
    assert FeatureStore(tmp_path).keys() == ["a", "b"]


def test_corrupt_manifest_and_missing_shard_name_the_problem(tmp_path):
    store = FeatureStore(tmp_path)
    store.append("a", make_record(2, 1))
    manifest = tmp_path / "manifest.json"
    good = manifest.read_text()

    manifest.write_text(good[: len(good) // 2])
    with pytest.raises(FeatureStoreError, match="manifest.json: corrupt feature store manifest"):
        FeatureStore(tmp_path)

    broken = json.loads(good)
    broken["shards"][0]["rows"] = 5
    manifest.write_text(json.dumps(broken))
    with pytest.raises(FeatureStoreError, match=r"shards\[0\]: keys cover 2 rows, the shard says 5"):
        FeatureStore(tmp_path)

    broken = json.loads(good)
    broken["shards"][0]["name"] = "shard-999999"
    manifest.write_text(json.dumps(broken))
    with pytest.raises(FeatureStoreError, match="shard-999999 is missing"):
        FeatureStore(tmp_path)

    manifest.write_text(good)
    (tmp_path / "shard-000000" / "scores.npy").write_bytes(b"not numpy")
    with pytest.raises(FeatureStoreError, match="scores.npy: cannot read"):
        FeatureStore(tmp_path).get("a")


def test_record_shapes_are_checked():
    with pytest.raises(FeatureStoreError, match=r"boxes have shape \(2, 3\)"):
        RegionRecord(np.zeros((2, 3)), np.zeros(2), np.zeros((2, 4)), np.zeros(2))
    with pytest.raises(FeatureStoreError, match="features have shape"):
        RegionRecord(np.zeros((2, 4)), np.zeros(2), np.zeros((3, 4)), np.zeros(2))


def test_readers_never_see_a_half_loaded_manifest_while_a_writer_appends(tmp_path):
    """A service searches (reads rows) while an upload appends; an append re-reads the
    manifest, and a reader in between must still see every row it saw before."""
    import threading

    store = FeatureStore(tmp_path)
    store.append_many([(f"k{i}", make_record(3, i)) for i in range(20)])
    rows = np.arange(len(store))
    expected = store.features(rows)
    errors: list[BaseException] = []
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            try:
                np.testing.assert_array_equal(store.features(rows), expected)
                assert store.get("k7").features.shape == (3, expected.shape[1])
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
                return

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(150):
            store.append(f"new{i}", make_record(2, 100 + i))
    finally:
        done.set()
        reader.join()
    assert not errors, errors[0]
    assert len(store) == len(rows) + 300


def test_a_reader_sees_another_writers_records_after_refresh(tmp_path):
    writer, reader = FeatureStore(tmp_path), FeatureStore(tmp_path)
    assert reader.refresh() is False and len(reader) == 0  # nothing written yet
    writer.append("a", make_record(2, 1))
    assert not reader.has("a")
    assert reader.refresh() is True and reader.keys() == ["a"]
    np.testing.assert_array_equal(reader.get("a").features, writer.get("a").features)
    assert reader.refresh() is False


def test_a_store_of_many_small_shards_reads_within_a_low_file_limit(tmp_path, monkeypatch):
    """The service appends one shard per upload; each mapped shard holds four descriptors.
    Reading every row of 100 shards must work with room for far fewer open files."""
    import os
    import resource

    store = FeatureStore(tmp_path)
    for i in range(100):
        store.append(f"k{i}", make_record(2, i))
    expected = np.concatenate([make_record(2, i).features for i in range(100)]).astype(np.float16)
    monkeypatch.setattr(featurestore, "MAX_OPEN_SHARDS", 8)
    reader = FeatureStore(tmp_path)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    open_now = len(os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (open_now + 100, hard))  # 100 shards need 400
    try:
        for _ in range(2):
            got = reader.features(np.arange(len(reader)))
            np.testing.assert_array_equal(got, expected.astype(np.float32))
        assert reader.get("k99").features.shape == (2, DIM)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_the_log_is_folded_into_the_manifest_and_both_are_read(tmp_path, monkeypatch):
    monkeypatch.setattr(featurestore, "CHECKPOINT_EVERY", 4)
    store = FeatureStore(tmp_path)
    for i in range(10):
        store.append(f"k{i}", make_record(2, i))
        manifest = json.loads((tmp_path / "manifest.json").read_text())
        lines = (tmp_path / "manifest.log").read_text().splitlines()
        # appends 1, 5 and 9 write a manifest holding everything; the others add a line
        assert len(lines) == i % 4 and len(manifest["shards"]) + len(lines) == i + 1
    assert manifest["version"] == 2
    reopened = FeatureStore(tmp_path)
    assert reopened.keys() == [f"k{i}" for i in range(10)] and len(reopened) == 20
    np.testing.assert_array_equal(reopened.features(np.arange(20)), store.features(np.arange(20)))

    # A crash after a new manifest was written but before the log was emptied: the log's
    # lines are in the manifest too, and are read once.
    logged = [json.loads(line) for line in (tmp_path / "manifest.log").read_text().splitlines()]
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "shards": manifest["shards"] + logged}))
    assert logged and FeatureStore(tmp_path).keys() == reopened.keys()


def test_a_version_1_store_is_read_and_appended_to(tmp_path):
    store = FeatureStore(tmp_path)
    store.append("a", make_record(2, 1))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "version": 1}))
    (tmp_path / "manifest.log").unlink()
    old = FeatureStore(tmp_path)
    assert old.keys() == ["a"]
    old.append("b", make_record(1, 2))
    assert FeatureStore(tmp_path).keys() == ["a", "b"]


def test_two_writers_taking_turns_never_lose_each_others_records(tmp_path):
    one, two = FeatureStore(tmp_path), FeatureStore(tmp_path)
    for i in range(6):
        (one if i % 2 == 0 else two).append(f"k{i}", make_record(2, i))
    assert one.keys() == [f"k{i}" for i in range(5)]  # up to its own last append
    assert two.keys() == [f"k{i}" for i in range(6)]
    assert one.refresh() and one.keys() == two.keys() == FeatureStore(tmp_path).keys()
    with pytest.raises(FeatureStoreError, match="already in the feature store"):
        one.append("k5", make_record(1, 9))  # the other writer's key, seen after the re-read


def test_keys_beyond_ascii_survive_the_manifest_and_the_log(tmp_path):
    store = FeatureStore(tmp_path)
    store.append("Ägyptisches Museum ☥ 1", make_record(2, 1))  # the manifest
    store.append("Ägyptisches Museum ☥ 2", make_record(2, 2))  # the log
    assert FeatureStore(tmp_path).keys() == ["Ägyptisches Museum ☥ 1", "Ägyptisches Museum ☥ 2"]


def fill(store: FeatureStore, count: int, first: int = 0) -> dict[str, RegionRecord]:
    """``count`` appends of one record each (1 to 4 rows): the service's one shard per upload."""
    records = {f"k{i}": make_record(1 + i % 4, i) for i in range(first, first + count)}
    for key, record in records.items():
        store.append(key, record)
    return records


def shard_folders(root) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("shard-"))


def test_compaction_merges_small_shards_and_keeps_rows_keys_and_contents(tmp_path, monkeypatch):
    monkeypatch.setattr(featurestore, "CHECKPOINT_EVERY", 8)  # some shards in the log
    store = FeatureStore(tmp_path)
    fill(store, 30)
    spans = {key: store.rows_of(key) for key in store.keys()}
    everything = store.features(np.arange(len(store)))
    assert store.compact(target_rows=20) == (30, 4)  # 73 rows: 8 shards (20 rows) a run
    for reopened in (store, FeatureStore(tmp_path)):
        assert {key: reopened.rows_of(key) for key in reopened.keys()} == spans
        np.testing.assert_array_equal(reopened.features(np.arange(len(reopened))), everything)
        np.testing.assert_array_equal(reopened.get("k17").kinds, make_record(2, 17).kinds)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [s["name"] for s in manifest["shards"]] == shard_folders(tmp_path)  # old folders went
    assert manifest["shards"][0]["name"] == "shard-000000-000007"
    assert (tmp_path / "manifest.log").read_text() == ""
    # Appends go on with new numbers and rows after the last; a second pass merges them in.
    fill(store, 3, first=30)
    assert shard_folders(tmp_path)[-1] == "shard-000032" and store.rows_of("k30") == (73, 3)
    assert store.compact(target_rows=20) == (7, 5)  # 13 + 3 + 4 rows, then 1
    assert FeatureStore(tmp_path).keys() == [f"k{i}" for i in range(33)]
    assert store.compact(target_rows=20) == (5, 5)  # nothing left to merge


def test_a_crash_before_the_manifest_replace_leaves_the_old_state(tmp_path, monkeypatch):
    store = FeatureStore(tmp_path)
    fill(store, 12)
    before = (tmp_path / "manifest.json").read_text(), (tmp_path / "manifest.log").read_text()
    folders = shard_folders(tmp_path)

    def power_cut(*args, **kwargs):
        raise OSError("simulated power cut")

    monkeypatch.setattr(featurestore, "write_json_atomic", power_cut)
    with pytest.raises(OSError, match="power cut"):
        store.compact(target_rows=10)
    monkeypatch.undo()
    assert ((tmp_path / "manifest.json").read_text(), (tmp_path / "manifest.log").read_text()) == before
    assert set(folders) < set(shard_folders(tmp_path))  # merged shards written, not named
    reopened = FeatureStore(tmp_path)
    assert reopened.keys() == store.keys() and len(reopened) == len(store)
    expected = store.features(np.arange(len(store)))
    assert reopened.compact(target_rows=10) == (12, 3)  # the rerun replaces the leftovers
    np.testing.assert_array_equal(FeatureStore(tmp_path).features(np.arange(len(store))), expected)
    assert len(shard_folders(tmp_path)) == 3


def test_a_crash_between_the_manifest_replace_and_the_emptied_log_reads_each_row_once(
        tmp_path, monkeypatch):
    store = FeatureStore(tmp_path)
    fill(store, 12)  # one shard in the manifest, 11 in the log
    expected = store.features(np.arange(len(store)))

    def power_cut(*args, **kwargs):
        raise OSError("simulated power cut")

    monkeypatch.setattr(featurestore, "write_text_atomic", power_cut)
    with pytest.raises(OSError, match="power cut"):
        store.compact(target_rows=10)
    monkeypatch.undo()
    assert len((tmp_path / "manifest.log").read_text().splitlines()) == 11  # still there
    reopened = FeatureStore(tmp_path)  # the log's lines start below the manifest's rows
    assert reopened.keys() == [f"k{i}" for i in range(12)]
    np.testing.assert_array_equal(reopened.features(np.arange(len(reopened))), expected)
    reopened.append("k12", make_record(2, 12))
    assert reopened.compact(target_rows=10)[1] == 4 and len(shard_folders(tmp_path)) == 4
    assert FeatureStore(tmp_path).rows_of("k12") == (len(expected), 2)


def test_a_reader_holding_the_old_shards_reads_the_same_rows_after_a_compaction(tmp_path, monkeypatch):
    writer = FeatureStore(tmp_path)
    fill(writer, 40)
    monkeypatch.setattr(featurestore, "MAX_OPEN_SHARDS", 4)  # most old shards are not mapped
    reader = FeatureStore(tmp_path)
    rows = np.arange(len(reader))
    expected = reader.features(rows)
    writer.compact(target_rows=16)
    assert not (tmp_path / "shard-000003").exists()
    np.testing.assert_array_equal(reader.features(rows), expected)  # re-reads the manifest
    np.testing.assert_array_equal(reader.get("k5").features, writer.get("k5").features)
    assert len(reader._view.shards) == len(writer._view.shards)


def test_appends_go_on_while_a_compaction_runs(tmp_path):
    import threading

    store = FeatureStore(tmp_path)
    fill(store, 60)
    compactor = FeatureStore(tmp_path)
    outcome: list[object] = []

    def compact() -> None:
        try:
            outcome.append(compactor.compact(target_rows=12))
        except BaseException as exc:  # noqa: BLE001 - reported below
            outcome.append(exc)

    thread = threading.Thread(target=compact)
    thread.start()
    appended = fill(store, 30, first=60)
    thread.join()
    assert outcome[0][0] == 60 and outcome[0][1] < 60 + 30, outcome  # + appends meanwhile
    final = FeatureStore(tmp_path)
    assert final.keys() == [f"k{i}" for i in range(90)]
    for key, record in appended.items():
        np.testing.assert_array_equal(final.get(key).features, record.features.astype(np.float16))
    assert final.compact(target_rows=12)[1] < 30  # 225 rows in runs of at most 12


def test_refresh_reads_only_the_new_log_lines(tmp_path, monkeypatch):
    writer, reader = FeatureStore(tmp_path), FeatureStore(tmp_path)
    fill(writer, 5)
    assert reader.refresh() and len(reader.keys()) == 5  # the first manifest: read whole
    whole_reads = []
    real_load = FeatureStore._load_manifest
    monkeypatch.setattr(FeatureStore, "_load_manifest",
                        lambda self, *a: (whole_reads.append(1), real_load(self, *a)))
    for first in (5, 6, 7):
        fill(writer, 1, first=first)
        assert reader.refresh() and reader.keys()[-1] == f"k{first}"
    assert reader.refresh() is False and whole_reads == []
    with open(tmp_path / "manifest.log", "a") as handle:
        handle.write('{"name": "shard-0000')  # a line being written is left for later
    assert reader.refresh() is False and len(reader.keys()) == 8
    np.testing.assert_array_equal(reader.features(np.arange(len(reader))),
                                  writer.features(np.arange(len(writer))))


def test_an_append_copies_only_the_recent_keys_and_all_stay_in_order(tmp_path, monkeypatch):
    monkeypatch.setattr(featurestore, "RECENT_KEYS", 3)
    store = FeatureStore(tmp_path)
    records = fill(store, 10)
    assert len(store._view.recent) <= 3  # the older keys joined the rest
    assert store.keys() == list(records) == FeatureStore(tmp_path).keys()
    start = 0
    for key, record in records.items():
        assert store.rows_of(key) == (start, len(record)) and key in store
        start += len(record)
    with pytest.raises(FeatureStoreError, match="already in the feature store"):
        store.append("k9", make_record(1, 1))


def test_store_compact_command_merges_the_service_store(tmp_path, capsys):
    from app.cli import main

    records = fill(FeatureStore(tmp_path / "features"), 12)
    assert main(["store", "compact", "--data-dir", str(tmp_path), "--target-rows", "10"]) == 0
    assert "12 shards -> 3, 30 rows, 12 keys" in capsys.readouterr().out
    reopened = FeatureStore(tmp_path / "features")
    for key, record in records.items():
        np.testing.assert_array_equal(reopened.get(key).features, record.features.astype(np.float16))
    assert main(["store", "compact", "--data-dir", str(tmp_path / "elsewhere")]) == 2
    assert "no feature store here" in capsys.readouterr().err
