"""FAISS vector indexes over database ids: the first stage of the two-stage search.

A :class:`VectorIndex` holds L2-normalised float32 vectors under int64 ids and scores by
inner product (= cosine). Below ``exact_below`` vectors it is exact (``IndexFlatIP`` inside
``IndexIDMap2``); above, an inverted file (``IndexIVFFlat``, ``nlist`` from the size,
``nprobe`` set for recall). IVF rather than HNSW because an artwork's deletion must remove
its vectors, which FAISS's HNSW cannot do. When FAISS sees a GPU the searches run on a GPU
copy of the index; the CPU index stays the one that is changed and saved.

On disk a folder holds ``index-<random>.faiss`` and ``manifest.json``::

    {"format": "artalign-vector-index", "version": 1, "file": "index-….faiss", "kind": "flat",
     "dim": 256, "count": 1234, "nlist": null, "nprobe": null,
     "model_version": "<sha256>", "state": {...the database state it reflects...}}

Saving writes the new index file under a fresh name, then replaces the manifest atomically,
then removes index files the manifest no longer names: a reader or a crash sees either the
old index or the new one, never half of one.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import faiss
import numpy as np

from index.atomic import write_atomic, write_json_atomic

log = logging.getLogger(__name__)

FORMAT = "artalign-vector-index"
VERSION = 1
MANIFEST = "manifest.json"
EXACT_BELOW = 50_000
MIN_POINTS_PER_LIST = 39  # FAISS warns when k-means gets fewer training points per centroid
KINDS = ("flat", "ivf")


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
    """(nlist, nprobe) for ``count`` vectors: ~4·sqrt(n) lists, probing 1/16 of them (>= 8)."""
    nlist = max(1, min(int(round(4 * math.sqrt(count))), count // MIN_POINTS_PER_LIST, 65_536))
    return nlist, min(nlist, max(8, nlist // 16))


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

    def __init__(
        self, dim: int, *, kind: str = "flat", nlist: int | None = None,
        nprobe: int | None = None, use_gpu: bool | None = None,
    ) -> None:
        if dim < 1:
            raise VectorIndexError(f"dim must be positive, got {dim}")
        if kind not in KINDS:
            raise VectorIndexError(f"kind must be one of {KINDS}, got {kind!r}")
        self.dim = dim
        self.kind = kind
        self.nlist = nlist
        self.nprobe = nprobe
        if kind == "flat":
            self._index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        else:
            if not nlist or not nprobe:
                raise VectorIndexError("an IVF index needs nlist and nprobe")
            self._quantizer = faiss.IndexFlatIP(dim)  # kept referenced: the IVF index uses it
            self._index = faiss.IndexIVFFlat(self._quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
            self._index.nprobe = nprobe
        self._init_search_state(use_gpu)

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
        exact_below: int = EXACT_BELOW, use_gpu: bool | None = None, seed: int = 0,
    ) -> VectorIndex:
        """A new index over ``ids``/``vectors``: exact below ``exact_below`` rows, else IVF."""
        ids = _check_ids(ids)
        dim = dim or (np.asarray(vectors).shape[-1] if np.asarray(vectors).size else 0)
        vectors = normalise(vectors, dim)
        if len(ids) != len(vectors):
            raise VectorIndexError(f"{len(ids)} ids for {len(vectors)} vectors")
        if len(ids) < max(exact_below, MIN_POINTS_PER_LIST):
            index = cls(dim, kind="flat", use_gpu=use_gpu)
        else:
            nlist, nprobe = ivf_params(len(ids))
            index = cls(dim, kind="ivf", nlist=nlist, nprobe=nprobe, use_gpu=use_gpu)
            sample = np.random.default_rng(seed).permutation(len(vectors))[: nlist * 256]
            log.info("training IVF index: %d lists on %d of %d vectors", nlist, len(sample), len(ids))
            index._index.train(vectors[np.sort(sample)])
        index.add(ids, vectors)
        return index

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
            self._index.remove_ids(faiss.IDSelectorBatch(ids))
            self._index.add_with_ids(vectors, ids)
            self._gpu_index = None

    def remove(self, ids: np.ndarray) -> int:
        """Remove ``ids`` (absent ones are ignored); returns how many vectors went."""
        ids = _check_ids(ids)
        if not len(ids):
            return 0
        with self._lock.writing():
            removed = int(self._index.remove_ids(faiss.IDSelectorBatch(ids)))
            self._gpu_index = None
        return removed

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
                    if self.kind == "ivf" else faiss.SearchParameters(sel=selector)
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
            "model_version": model_version, "state": state,
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
        index.dim, index.kind = manifest["dim"], manifest["kind"]
        index.nlist, index.nprobe = manifest["nlist"], manifest["nprobe"]
        index._index = faiss_index
        if index.kind == "ivf":
            faiss_index.nprobe = index.nprobe
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
    if manifest.get("version") != VERSION:
        raise VectorIndexError(f"{path}: manifest version {manifest.get('version')!r}, expected {VERSION}")
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

