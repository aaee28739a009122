"""index.vectors: FAISS search against a plain numpy reference, updates, save/load."""

from __future__ import annotations

import json

import numpy as np
import pytest

from index.vectors import (
    KINDS,
    IndexPlan,
    VectorIndex,
    VectorIndexError,
    candidates_for,
    ivf_params,
    plan_index,
    read_manifest,
)

DIM = 16


def unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def reference_search(ids, vectors, queries, k):
    """Exhaustive inner product in numpy: best first, ties by id, -1 past the end."""
    scores = unit(queries) @ unit(vectors).T  # (q, n)
    out_ids = np.full((len(queries), k), -1, dtype=np.int64)
    out_scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    for q in range(len(queries)):
        order = np.lexsort((ids, -scores[q]))[:k]
        out_ids[q, : len(order)] = ids[order]
        out_scores[q, : len(order)] = scores[q, order]
    return out_scores, out_ids


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(2000, DIM)).astype(np.float32)
    ids = rng.permutation(10_000)[:2000].astype(np.int64)  # sparse, unordered, like db ids
    queries = rng.normal(size=(20, DIM)).astype(np.float32)
    return ids, vectors, queries


def test_flat_search_equals_numpy_reference(data):
    ids, vectors, queries = data
    index = VectorIndex.build(ids, vectors)
    assert index.kind == "flat" and len(index) == len(ids)
    scores, found = index.search(queries, 10)
    ref_scores, ref_ids = reference_search(ids, vectors, queries, 10)
    np.testing.assert_array_equal(found, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)


def clustered(n: int, dim: int = DIM, centres: int = 40, seed: int = 1):
    """Unit vectors around ``centres`` random directions (real embeddings cluster), ids
    sparse and unordered like database ids, and queries near the same directions."""
    rng = np.random.default_rng(seed)
    directions = unit(rng.normal(size=(centres, dim)))
    vectors = unit(directions[rng.integers(0, centres, n)] + 0.35 * rng.normal(size=(n, dim)) / np.sqrt(dim))
    queries = unit(directions[rng.integers(0, centres, 30)] + 0.35 * rng.normal(size=(30, dim)) / np.sqrt(dim))
    return rng.permutation(10 * n)[:n].astype(np.int64), vectors.astype(np.float32), queries


def recall_at_10(index, ids, vectors, queries) -> float:
    _, found = index.search(queries, 10)
    _, ref_ids = reference_search(ids, vectors, queries, 10)
    return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, ref_ids, strict=True)]))


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_builds_searches_deletes_saves_and_loads(kind, tmp_path):
    ids, vectors, queries = clustered(12_000)
    index = VectorIndex.build(ids, vectors, kind=kind, use_gpu=False)
    assert index.kind == kind and len(index) == len(ids)
    # Floors below what each kind reaches here (flat and IVF 1.0, SQ8 and PQ ~0.97), far
    # above a broken index (~0).
    floor = {"flat": 1.0, "ivf": 0.95, "ivf-sq8": 0.9, "ivf-pq": 0.8}[kind]
    assert recall_at_10(index, ids, vectors, queries) >= floor
    # Deleting makes the ids unfindable, whatever the codes: search with their own vectors.
    gone = ids[:300]
    assert index.remove(gone) == 300 and len(index) == len(ids) - 300
    _, found = index.search(vectors[:300], 10)
    assert not np.isin(found, gone).any()
    assert recall_at_10(index, ids[300:], vectors[300:], queries) >= floor
    index.save(tmp_path, model_version="m", state={"fragments": [1, 2, 3]})
    manifest = read_manifest(tmp_path)
    assert manifest["version"] == 2 and manifest["kind"] == kind
    assert manifest["pq_bytes"] == (index.plan.pq_bytes if kind == "ivf-pq" else None)
    loaded = VectorIndex.load(tmp_path, use_gpu=False)
    assert loaded.plan == index.plan and len(loaded) == len(index)
    np.testing.assert_array_equal(loaded.search(queries, 10)[1], index.search(queries, 10)[1])


def test_the_memory_budget_picks_the_kind():
    dim, count = 256, 10_000_000
    assert plan_index(1000, dim).kind == "flat"
    assert plan_index(100_000, dim, memory_budget=1 << 30).kind == "ivf"  # 103 MB of floats
    # 10M vectors at d 256 (+ 48 B of ids and id map each): 10.7 GB as floats, 3.0 GB as
    # 8-bit codes, 1.1 GB as 64 B PQ codes, 0.8 GB as 32 B
    assert plan_index(count, dim).kind == "ivf-sq8"
    assert plan_index(count, dim, memory_budget=20 << 30).kind == "ivf"
    small = plan_index(count, dim, memory_budget=2 << 30)
    assert (small.kind, small.pq_bytes) == ("ivf-pq", 64)
    assert plan_index(count, dim, memory_budget=1 << 30).pq_bytes == 32
    for plan in (plan_index(count, dim), small):
        assert plan.bytes_for(count, dim) <= (4 << 30 if plan is not small else 2 << 30)
    assert plan_index(count, dim, kind="ivf-pq").pq_bytes == 64  # a kind can be asked for
    with pytest.raises(VectorIndexError, match="do not fit a memory budget.*retrieval.memory_budget"):
        plan_index(count, dim, memory_budget=10 << 20)
    with pytest.raises(VectorIndexError, match="kind must be one of"):
        plan_index(count, dim, kind="hnsw")


def test_k_grows_with_the_index_as_measured():
    # docs/SCALING.md: overlap@10 >= 0.95 needs K 100 at 100k fragments, K 500 at 1M
    assert candidates_for(0) == candidates_for(100_000) == 100
    assert candidates_for(1_000_000) == 500
    sizes = [10**e for e in range(2, 10)]
    assert [candidates_for(n) for n in sizes] == sorted(candidates_for(n) for n in sizes)


def test_a_version_1_manifest_still_loads(tmp_path):
    ids, vectors, queries = clustered(4000)
    index = VectorIndex.build(ids, vectors, exact_below=100, kind="ivf", use_gpu=False)
    index.save(tmp_path, model_version="m", state={})
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    del manifest["pq_bytes"]
    manifest.update(version=1, nprobe=index.nlist // 16)  # what version 1 wrote
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    loaded = VectorIndex.load(tmp_path, use_gpu=False)
    assert loaded.plan == IndexPlan("ivf", index.nlist, index.nprobe)
    np.testing.assert_array_equal(loaded.search(queries, 5)[1], index.search(queries, 5)[1])


def test_ivf_probing_every_list_is_exact_and_default_probing_finds_most(data):
    ids, vectors, queries = data
    index = VectorIndex.build(ids, vectors, exact_below=100)
    assert index.kind == "ivf" and (index.nlist, index.nprobe) == ivf_params(len(ids))
    _, ref_ids = reference_search(ids, vectors, queries, 10)
    _, approx = index.search(queries, 10)
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(approx, ref_ids, strict=True)])
    assert overlap > 0.5  # random vectors are the hard case for IVF; real ones cluster
    index.set_nprobe(index.nlist)
    _, exact = index.search(queries, 10)
    np.testing.assert_array_equal(exact, ref_ids)


@pytest.mark.parametrize("exact_below", [100_000, 100])
def test_missing_results_are_minus_one(exact_below, data):
    ids, vectors, queries = data
    index = VectorIndex.build(ids[:50], vectors[:50], exact_below=exact_below)
    scores, found = index.search(queries[:2], 60)
    assert (found[:, 50:] == -1).all() and np.isneginf(scores[:, 50:]).all()
    assert (found[:, :50] >= 0).all()
    empty = VectorIndex(DIM)
    assert (empty.search(queries[:1], 3)[1] == -1).all()


@pytest.mark.parametrize("exact_below", [100_000, 100])
def test_remove_add_and_allowed_ids_match_reference(exact_below, data):
    ids, vectors, queries = data
    index = VectorIndex.build(ids, vectors, exact_below=exact_below)
    assert index.remove(ids[:500]) == 500
    assert index.remove(ids[:500]) == 0  # absent ids are ignored
    keep_ids, keep_vectors = ids[500:], vectors[500:]
    allowed = keep_ids[::7]
    mask = np.isin(keep_ids, allowed)
    _, found = index.search(queries, 5, allowed_ids=allowed)
    _, ref_ids = reference_search(keep_ids[mask], keep_vectors[mask], queries, 5)
    np.testing.assert_array_equal(found, ref_ids)
    # Adding an id that is present replaces its vector rather than duplicating it.
    index.add(keep_ids[:1], queries[:1])
    assert len(index) == len(keep_ids)
    assert index.search(queries[:1], 1, allowed_ids=keep_ids[:3])[1][0, 0] == keep_ids[0]


def test_save_load_round_trip_and_manifest(tmp_path, data):
    ids, vectors, queries = data
    index = VectorIndex.build(ids, vectors)
    state = {"fragments": {"count": 2000, "max_id": 9999}}
    index.save(tmp_path, model_version="abc", state=state)
    first_file = read_manifest(tmp_path)["file"]
    index.remove(ids[:1])
    index.save(tmp_path, model_version="abc", state=state)
    manifest = read_manifest(tmp_path)
    assert manifest["count"] == 1999 and manifest["model_version"] == "abc"
    assert manifest["state"] == state and manifest["kind"] == "flat"
    # The old index file went; no temporary files are left.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([manifest["file"], "manifest.json"])
    assert manifest["file"] != first_file
    loaded = VectorIndex.load(tmp_path)
    np.testing.assert_array_equal(loaded.search(queries, 5)[1], index.search(queries, 5)[1])


def test_bad_input_and_bad_files_name_the_problem(tmp_path, data):
    ids, vectors, _ = data
    with pytest.raises(VectorIndexError, match=r"shape \(3, 4\), expected \(n, 16\)"):
        VectorIndex(DIM).add(ids[:3], np.ones((3, 4)))
    with pytest.raises(VectorIndexError, match="3 ids for 2 vectors"):
        VectorIndex(DIM).add(ids[:3], vectors[:2])
    with pytest.raises(VectorIndexError, match="NaN"):
        VectorIndex(DIM).add(ids[:1], np.full((1, DIM), np.nan))
    with pytest.raises(VectorIndexError, match="non-negative"):
        VectorIndex(DIM).add(np.array([-1]), vectors[:1])
    assert read_manifest(tmp_path) is None
    with pytest.raises(VectorIndexError, match="no manifest.json"):
        VectorIndex.load(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(VectorIndexError, match="corrupt index manifest"):
        VectorIndex.load(tmp_path)
    VectorIndex.build(ids, vectors).save(tmp_path, model_version="m", state={})
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    (tmp_path / manifest["file"]).write_bytes(b"garbage")
    with pytest.raises(VectorIndexError, match="cannot read the FAISS index"):
        VectorIndex.load(tmp_path)


def test_searches_run_beside_updates(data):
    """Searches from several threads while another thread adds and removes: every search
    sees a whole index (no crash, no half-added vector), and the end state is exact."""
    import threading

    ids, vectors, queries = data
    index = VectorIndex.build(ids[:1000], vectors[:1000])
    errors: list[BaseException] = []
    stop = threading.Event()

    def search() -> None:
        try:
            while not stop.is_set():
                scores, found = index.search(queries, 5)
                assert (found >= 0).all() and np.isfinite(scores).all()
        except BaseException as exc:  # reported to the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=search) for _ in range(3)]
    for thread in threads:
        thread.start()
    for start in range(1000, 2000, 100):
        index.add(ids[start:start + 100], vectors[start:start + 100])
        index.remove(ids[start - 1000:start - 900])
    stop.set()
    for thread in threads:
        thread.join()
    assert not errors
    _, ref_ids = reference_search(ids[1000:], vectors[1000:], queries, 5)
    np.testing.assert_array_equal(index.search(queries, 5)[1], ref_ids)


def test_a_waiting_writer_holds_back_new_readers():
    import threading

    from index.vectors import ReadWriteLock

    lock = ReadWriteLock()
    order: list[str] = []
    with lock.reading():
        writer = threading.Thread(target=lambda: _hold(lock.writing, order, "write"))
        writer.start()
        while not lock._writers_waiting:  # the writer is queued behind our read
            threading.Event().wait(0.001)
        reader = threading.Thread(target=lambda: _hold(lock.reading, order, "read"))
        reader.start()
        order.append("first read ends")
    writer.join()
    reader.join()
    assert order == ["first read ends", "write", "read"]


def _hold(context, order, name):
    with context():
        order.append(name)
