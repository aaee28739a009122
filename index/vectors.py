"""FAISS vector indexes over database ids: the first stage of the two-stage search.

A :class:`VectorIndex` holds L2-normalised float32 vectors under int64 ids and scores by
inner product (= cosine). Below ``exact_below`` vectors it is exact (``IndexFlatIP`` inside
``IndexIDMap2``); above, an inverted file whose lists hold what fits the memory budget
(:func:`plan_index`): the float32 vectors (``ivf``: IVF-Flat), 8-bit scalar codes
(``ivf-sq8``, a quarter of the size) or product-quantised codes (``ivf-pq``, 8-64 bytes a
vector). The compressed kinds only choose candidates; the SCAN rerank over the raw region
features orders them, so compression costs candidates, not final scores. ``nlist`` grows
with the size, ``nprobe`` comes from measurement (docs/SCALING.md). IVF rather than HNSW
because an artwork's deletion must remove its vectors, which FAISS's HNSW cannot do. When FAISS sees a GPU the searches run on a GPU
copy of the index; the CPU index stays the one that is changed and saved.

On disk a folder holds ``index-<random>.faiss`` and ``manifest.json``::

    {"format": "artalign-vector-index", "version": 2, "file": "index-….faiss", "kind": "flat",
     "dim": 256, "count": 1234, "nlist": null, "nprobe": null, "pq_bytes": null,
     "model_version": "<sha256>", "state": {...what it reflects, as its owner records it...}}

Saving writes the new index file under a fresh name, then replaces the manifest atomically,
then removes index files the manifest no longer names: a reader or a crash sees either the
old index or the new one, never half of one. Version-1 manifests (kinds ``flat`` and
``ivf``, no ``pq_bytes``) load as they are, with today's ``nprobe``.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import faiss
import numpy as np

from index.atomic import write_atomic, write_json_atomic

log = logging.getLogger(__name__)

FORMAT = "artalign-vector-index"
VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
EXACT_BELOW = 50_000
DEFAULT_MEMORY_BUDGET = 4 << 30  # bytes of vectors, codes and ids an index may hold
MIN_POINTS_PER_LIST = 39  # FAISS warns when k-means gets fewer training points per centroid
TRAIN_POINTS_PER_LIST = 64  # k-means sample: enough for stable centroids, quick at 10M vectors
NPROBE = 16  # lists probed per query: see ivf_params
# (index size below, K): measured overlap@10 0.982 at 100k with K 100, 0.988 at 1M with K 500,
# 0.960 at 10M with K 2000 (IVF-SQ8)
CANDIDATES = ((300_000, 100), (3_000_000, 500), (math.inf, 2000))
MAX_NLIST = 2048  # builds stay minutes at 10M on one thread; 16 lists of ~5,000 answer in ~1 ms
PQ_TRAIN_POINTS = 256 * TRAIN_POINTS_PER_LIST  # each sub-quantizer has 256 centroids
PQ_BYTES = (64, 32, 16, 8)  # code sizes tried, largest (most precise) first
KINDS = ("flat", "ivf", "ivf-sq8", "ivf-pq")
# FAISS factory strings: {nlist} lists, {pq} bytes per product-quantised code
FACTORY = {"flat": "IDMap2,Flat", "ivf": "IVF{nlist},Flat", "ivf-sq8": "IVF{nlist},SQ8",
           "ivf-pq": "IVF{nlist},PQ{pq}"}


class VectorIndexError(ValueError):
    """An index folder, manifest or input array that cannot be used; the message says why."""


def normalise(vectors: np.ndarray, dim: int, what: str = "vectors") -> np.ndarray:
    """(n, dim) float32 rows scaled to unit length; refuses wrong shapes and non-finite values."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim == 1:
        vectors = vectors.reshape(1, -1)
    if vectors.ndim != 2 or vectors.shape[1] != dim:
        raise VectorIndexError(f"{what} have shape {vectors.shape}, expected (n, {dim})")
    if not np.isfinite(vectors).all():
        raise VectorIndexError(f"{what} contain NaN or infinite values")
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    # A zero vector stays zero (it scores 0 against everything) rather than becoming NaN.
    return np.ascontiguousarray(vectors / np.maximum(norms, 1e-12))


def ivf_params(count: int) -> tuple[int, int]:
    """(nlist, nprobe) for ``count`` vectors: ~4·sqrt(n) lists (at most MAX_NLIST), probing a
    fixed number of them, measured with `artalign bench search` (docs/SCALING.md): the SCAN
    rerank of K candidates forgives the lists a query misses."""
    nlist = max(1, min(int(round(4 * math.sqrt(count))), count // MIN_POINTS_PER_LIST, MAX_NLIST))
    return nlist, min(nlist, NPROBE)


def candidates_for(count: int) -> int:
    """K, the candidates to rerank from an index of ``count`` vectors, measured with
    `artalign bench search` (docs/SCALING.md): the smallest K whose top 10 after the SCAN
    rerank overlaps the exhaustive top 10 by at least 0.95. It grows with the collection:
    the more fragments, the more of them tie on the pooled score, in any order."""
    return next(k for below, k in CANDIDATES if count < below)


@dataclass(frozen=True)
class IndexPlan:
    """What :meth:`VectorIndex.build` makes: a kind, its list counts and its code size."""

    kind: str
    nlist: int | None = None
    nprobe: int | None = None
    pq_bytes: int | None = None

    def bytes_for(self, count: int, dim: int) -> int:
        """Memory of ``count`` vectors: codes, ids (8 B; 16 B in the flat index's id map,
        8 + ~40 B in an IVF index's id -> list hash table) and the coarse centroids."""
        per_vector = {"flat": 4 * dim + 16, "ivf": 4 * dim + 48, "ivf-sq8": dim + 48,
                      "ivf-pq": (self.pq_bytes or 0) + 48}[self.kind]
        return count * per_vector + 4 * dim * (self.nlist or 0)


def plan_index(
    count: int, dim: int, *, memory_budget: int = DEFAULT_MEMORY_BUDGET,
    exact_below: int = EXACT_BELOW, kind: str | None = None,
) -> IndexPlan:
    """The index for ``count`` vectors of ``dim``: exact below ``exact_below``, else the most
    precise IVF kind whose memory fits ``memory_budget`` bytes (or ``kind`` when given)."""
    if kind is not None and kind not in KINDS:
        raise VectorIndexError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == "flat" or (kind is None and count < max(exact_below, MIN_POINTS_PER_LIST)):
        return IndexPlan("flat")
    nlist, nprobe = ivf_params(count)
    plans = [IndexPlan("ivf", nlist, nprobe), IndexPlan("ivf-sq8", nlist, nprobe)]
    code_sizes = [m for m in PQ_BYTES if dim % m == 0] or [max(m for m in range(1, 65) if dim % m == 0)]
    plans += [IndexPlan("ivf-pq", nlist, nprobe, m) for m in code_sizes]
    if kind is not None:
        return next(plan for plan in plans if plan.kind == kind)
    for plan in plans:
        if plan.bytes_for(count, dim) <= memory_budget:
            return plan
    smallest = plans[-1]
    raise VectorIndexError(
        f"{count:,} vectors of dim {dim} do not fit a memory budget of {memory_budget:,} bytes: "
        f"the smallest index ({smallest.kind}, {smallest.pq_bytes} B codes) needs "
        f"{smallest.bytes_for(count, dim):,}; raise retrieval.memory_budget"
    )


class ReadWriteLock:
    """Many searches at once, or one change alone (FAISS searches are safe to run together,
    but not beside an add or a remove). A waiting writer holds back new readers, so a stream
    of searches cannot starve an update."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._readers = 0
        self._writing = False
        self._writers_waiting = 0

    @contextmanager
    def reading(self) -> Iterator[None]:
        with self._condition:
            self._condition.wait_for(lambda: not self._writing and not self._writers_waiting)
            self._readers += 1
        try:
            yield
        finally:
            with self._condition:
                self._readers -= 1
                self._condition.notify_all()

    @contextmanager
    def writing(self) -> Iterator[None]:
        with self._condition:
            self._writers_waiting += 1
            self._condition.wait_for(lambda: not self._writing and not self._readers)
            self._writers_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._condition:
                self._writing = False
                self._condition.notify_all()


class VectorIndex:
    """Vectors under int64 ids; ``search`` returns (scores, ids) best first, -1 for missing."""

    def __init__(self, dim: int, plan: IndexPlan | None = None, *, use_gpu: bool | None = None) -> None:
        """An empty index of ``plan`` (exact when None); an IVF kind must be trained
        (:meth:`train`) before vectors are added."""
        plan = plan or IndexPlan("flat")
        if dim < 1:
            raise VectorIndexError(f"dim must be positive, got {dim}")
        if plan.kind not in KINDS:
            raise VectorIndexError(f"kind must be one of {KINDS}, got {plan.kind!r}")
        if plan.kind != "flat" and not (plan.nlist and plan.nprobe):
            raise VectorIndexError("an IVF index needs nlist and nprobe")
        if plan.kind == "ivf-pq" and not plan.pq_bytes:
            raise VectorIndexError("an IVF-PQ index needs pq_bytes")
        self.dim = dim
        self.plan = plan
        factory = FACTORY[plan.kind].format(nlist=plan.nlist, pq=plan.pq_bytes)
        self._index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        self._set_nprobe()
        self._map_ids()
        self._init_search_state(use_gpu)

    @property
    def kind(self) -> str:
        return self.plan.kind

    @property
    def nlist(self) -> int | None:
        return self.plan.nlist

    @property
    def nprobe(self) -> int | None:
        return self.plan.nprobe

    def set_nprobe(self, nprobe: int) -> None:
        """Probe ``nprobe`` lists per query from now on (an IVF kind; benchmarks sweep it)."""
        if self.kind == "flat" or nprobe < 1:
            raise VectorIndexError(f"nprobe needs an IVF index and a positive value, got {nprobe}")
        with self._lock.writing():
            self.plan = IndexPlan(self.kind, self.nlist, min(nprobe, self.nlist or nprobe), self.plan.pq_bytes)
            self._set_nprobe()
            self._gpu_index = None

    def _set_nprobe(self) -> None:
        if self.kind != "flat":
            faiss.extract_index_ivf(self._index).nprobe = self.nprobe

    def _map_ids(self) -> None:
        """Give an IVF index a hash table id -> (list, offset), so that removing an
        artwork's ids costs the same at any size (without it FAISS scans every list: 28 ms
        per removal at 10M vectors, twice per upload)."""
        if self.kind != "flat":
            ivf = faiss.extract_index_ivf(self._index)
            if ivf.direct_map.type != faiss.DirectMap.Hashtable:
                ivf.set_direct_map_type(faiss.DirectMap.Hashtable)

    def _selector(self, ids: np.ndarray) -> Any:
        """The ids to remove, as the index's id map takes them (a hash table: a plain array)."""
        return faiss.IDSelectorArray(ids) if self.kind != "flat" else faiss.IDSelectorBatch(ids)

    def _init_search_state(self, use_gpu: bool | None) -> None:
        """The locks and the GPU copy, shared by a new index and a loaded one."""
        self.use_gpu = faiss.get_num_gpus() > 0 if use_gpu is None else use_gpu
        self._gpu_index: Any = None  # a search copy, rebuilt after the CPU index changes
        self._gpu_resources: Any = None
        self._lock = ReadWriteLock()
        self._gpu_lock = threading.Lock()

    # -- building -----------------------------------------------------------------------

    @classmethod
    def build(
        cls, ids: np.ndarray, vectors: np.ndarray, *, dim: int | None = None,
        exact_below: int = EXACT_BELOW, memory_budget: int = DEFAULT_MEMORY_BUDGET,
        kind: str | None = None, use_gpu: bool | None = None, seed: int = 0,
    ) -> VectorIndex:
        """A new index over ``ids``/``vectors``, of the kind :func:`plan_index` picks."""
        ids = _check_ids(ids)
        dim = dim or (np.asarray(vectors).shape[-1] if np.asarray(vectors).size else 0)
        vectors = normalise(vectors, dim)
        if len(ids) != len(vectors):
            raise VectorIndexError(f"{len(ids)} ids for {len(vectors)} vectors")
        plan = plan_index(len(ids), dim, memory_budget=memory_budget, exact_below=exact_below, kind=kind)
        index = cls(dim, plan, use_gpu=use_gpu)
        index.train(vectors, seed=seed)
        index.add(ids, vectors)
        return index

    def train(self, vectors: np.ndarray, *, seed: int = 0) -> None:
        """Learn the coarse centroids (and the codes' quantizer) from a sample of ``vectors``
        (n, dim); nothing to learn for the exact kind. Call before the first :meth:`add`."""
        if self.kind == "flat":
            return
        vectors = normalise(vectors, self.dim)
        wanted = self.nlist * TRAIN_POINTS_PER_LIST
        if self.kind == "ivf-pq":
            wanted = max(wanted, PQ_TRAIN_POINTS)
        sample = np.random.default_rng(seed).permutation(len(vectors))[:wanted]
        log.info("training %s index: %d lists on %d of %d vectors", self.kind, self.nlist,
                 len(sample), len(vectors))
        if self.kind == "ivf-pq":
            ivf = faiss.downcast_index(faiss.extract_index_ivf(self._index))
            # Polysemous training reorders codes for Hamming filtering, which we do not use,
            # and takes minutes; the sub-quantizers' k-means need no more than the sample.
            ivf.do_polysemous_training = False
            ivf.pq.cp.max_points_per_centroid = TRAIN_POINTS_PER_LIST
        with self._lock.writing():
            self._index.train(vectors[np.sort(sample)])

    def __len__(self) -> int:
        return int(self._index.ntotal)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add (or replace: an id present is removed first) ``vectors`` (n, dim) under ``ids`` (n,)."""
        ids = _check_ids(ids)
        vectors = normalise(vectors, self.dim)
        if len(ids) != len(vectors):
            raise VectorIndexError(f"{len(ids)} ids for {len(vectors)} vectors")
        if not len(ids):
            return
        with self._lock.writing():
            self._index.remove_ids(self._selector(ids))
            self._index.add_with_ids(vectors, ids)
            self._gpu_index = None

    def remove(self, ids: np.ndarray) -> int:
        """Remove ``ids`` (absent ones are ignored); returns how many vectors went."""
        ids = _check_ids(ids)
        if not len(ids):
            return 0
        with self._lock.writing():
            removed = int(self._index.remove_ids(self._selector(ids)))
            self._gpu_index = None
        return removed

    def ids(self) -> np.ndarray:
        """Every id held, ascending (n,) int64: for checks that the index agrees with its source."""
        with self._lock.reading():
            if self.kind == "flat":
                found = faiss.vector_to_array(faiss.downcast_index(self._index).id_map)
            else:
                lists = faiss.extract_index_ivf(self._index).invlists
                found = np.concatenate([np.zeros(0, np.int64)] + [
                    faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).copy()
                    for i in range(lists.nlist) if lists.list_size(i)
                ])
        return np.sort(found.astype(np.int64))

    def copy(self) -> VectorIndex:
        """An independent copy (FAISS clone, in memory): a snapshot is written from it while
        this index takes further changes. Costs a second index's memory until dropped."""
        with self._lock.reading():
            clone = faiss.clone_index(self._index)
        index = VectorIndex.__new__(VectorIndex)
        index.dim, index.plan, index._index = self.dim, self.plan, clone
        index._init_search_state(False)
        return index

    # -- searching ----------------------------------------------------------------------

    def search(
        self, queries: np.ndarray, k: int, *, allowed_ids: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` by inner product for each query row.

        queries: (q, dim) (normalised here). Returns scores (q, k) float32, best first, and
        ids (q, k) int64, -1 (score -inf) where fewer than ``k`` vectors qualify.
        ``allowed_ids`` restricts the search to those ids (metadata filters).
        """
        if k < 1:
            raise VectorIndexError(f"k must be at least 1, got {k}")
        queries = normalise(queries, self.dim, "queries")
        with self._lock.reading():
            if allowed_ids is not None:
                # Selectors run on the CPU index (GPU indexes do not take them). An IVF search
                # probes every list: the allowed ids may sit in lists the query is far from.
                selector = faiss.IDSelectorBatch(_check_ids(allowed_ids))
                params = (
                    faiss.SearchParametersIVF(sel=selector, nprobe=self.nlist)
                    if self.kind != "flat" else faiss.SearchParameters(sel=selector)
                )
                scores, ids = self._index.search(queries, k, params=params)
            else:
                scores, ids = self._searcher().search(queries, k)
        scores = np.asarray(scores, dtype=np.float32)
        ids = np.asarray(ids, dtype=np.int64)
        scores[ids < 0] = -np.inf
        return scores, ids

    def _searcher(self) -> Any:
        if not self.use_gpu or len(self) == 0:
            return self._index
        with self._gpu_lock:  # two searches must not both copy the index
            if self._gpu_index is None:
                try:
                    if self._gpu_resources is None:
                        self._gpu_resources = faiss.StandardGpuResources()
                    self._gpu_index = faiss.index_cpu_to_gpu(self._gpu_resources, 0, self._index)
                except (AttributeError, RuntimeError) as exc:
                    log.warning("searching on the CPU: FAISS could not copy the index to the GPU (%s)", exc)
                    self.use_gpu = False
                    return self._index
            return self._gpu_index

    # -- saving and loading -------------------------------------------------------------

    def save(self, folder: str | Path, *, model_version: str, state: dict[str, Any]) -> Path:
        """Write the index and its manifest into ``folder`` atomically; returns the manifest path."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        name = f"index-{uuid.uuid4().hex}.faiss"
        with self._lock.reading():
            write_atomic(folder / name, self._write_to)
            count = len(self)
        manifest = {
            "format": FORMAT, "version": VERSION, "file": name, "kind": self.kind,
            "dim": self.dim, "count": count, "nlist": self.nlist, "nprobe": self.nprobe,
            "pq_bytes": self.plan.pq_bytes, "model_version": model_version, "state": state,
        }
        write_json_atomic(folder / MANIFEST, manifest)
        for stale in folder.glob("index-*.faiss"):
            if stale.name != name:
                stale.unlink(missing_ok=True)
        log.info("saved %s index of %d vectors to %s", self.kind, count, folder)
        return folder / MANIFEST

    def _write_to(self, handle: IO[bytes]) -> None:
        writer = faiss.PyCallbackIOWriter(handle.write)
        faiss.write_index(self._index, writer)
        del writer  # flushes what it buffered

    @classmethod
    def load(cls, folder: str | Path, *, use_gpu: bool | None = None) -> VectorIndex:
        """The index saved in ``folder``; :class:`VectorIndexError` when it cannot be used."""
        folder = Path(folder)
        manifest = read_manifest(folder)
        if manifest is None:
            raise VectorIndexError(f"{folder}: no {MANIFEST} (build the index first)")
        path = folder / manifest["file"]
        try:
            faiss_index = faiss.read_index(str(path))
        except RuntimeError as exc:
            raise VectorIndexError(f"{path}: cannot read the FAISS index ({exc})") from exc
        if faiss_index.d != manifest["dim"] or faiss_index.ntotal != manifest["count"]:
            raise VectorIndexError(
                f"{path}: holds {faiss_index.ntotal} vectors of dim {faiss_index.d}, the manifest "
                f"says {manifest['count']} of dim {manifest['dim']}"
            )
        index = cls.__new__(cls)
        index.dim = manifest["dim"]
        nlist, nprobe = manifest["nlist"], manifest["nprobe"]
        if manifest["version"] == 1 and manifest["kind"] == "ivf":
            nprobe = min(nlist, NPROBE)  # version 1 probed nlist/16: far slower
        index.plan = IndexPlan(manifest["kind"], nlist, nprobe, manifest.get("pq_bytes"))
        index._index = faiss_index
        index._set_nprobe()
        index._map_ids()  # version 1 IVF indexes were saved without one
        index._init_search_state(use_gpu)
        return index


def read_manifest(folder: str | Path) -> dict[str, Any] | None:
    """The manifest saved in ``folder``, None when there is none; refuses a malformed one."""
    path = Path(folder) / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise VectorIndexError(f"{path}: corrupt index manifest ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise VectorIndexError(f"{path}: not an {FORMAT} manifest")
    if manifest.get("version") not in READABLE_VERSIONS:
        raise VectorIndexError(
            f"{path}: manifest version {manifest.get('version')!r}, expected one of {READABLE_VERSIONS}"
        )
    for field, kind in (("file", str), ("kind", str), ("dim", int), ("count", int),
                        ("model_version", str), ("state", dict)):
        if not isinstance(manifest.get(field), kind):
            raise VectorIndexError(f"{path}: field {field!r} must be a {kind.__name__}")
    if manifest["kind"] not in KINDS:
        raise VectorIndexError(f"{path}: field 'kind' must be one of {KINDS}")
    return manifest


def _check_ids(ids: np.ndarray) -> np.ndarray:
    ids = np.ascontiguousarray(np.asarray(ids).reshape(-1))
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise VectorIndexError(f"ids must be integers, got {ids.dtype}")
    ids = ids.astype(np.int64)
    if ids.size and ids.min() < 0:
        raise VectorIndexError("ids must be non-negative (-1 means 'missing' in results)")
    return ids

