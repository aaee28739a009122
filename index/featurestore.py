"""Raw region features on disk: append-only shards of .npy files, a JSON manifest and a log.

Layout (see docs/ARCHITECTURE.md)::

    <root>/manifest.json   {"version": 2, "dim": D_raw, "extractor": "<sha256>",
                            "shards": [{"name", "rows", "keys": {key: [start, count]}}]}
    <root>/manifest.log    the shards appended since: one {"name", "rows", "keys"} per line
    <root>/shard-000000/   features.npy (n, D) float16, boxes.npy (n, 4) float32,
                           scores.npy (n,) float32, kinds.npy (n,) int8

``start`` in the manifest is a *global* row number: shards are numbered in append order and a
row number never changes, so the database and the index can hold row numbers.

Appending is crash safe: the new shard is written and fsynced in a hidden temporary folder,
renamed to its final name, and only then recorded: one line appended to the log and fsynced,
so an append costs the same whatever the store holds (the service appends one shard per
upload). Every ``CHECKPOINT_EVERY`` shards the log is folded into a new manifest.json
(``os.replace``) and emptied. A crash at any point leaves a manifest and a log that name only
complete shards: a line cut short is ignored, and an orphan shard left by a crash before its
line was written is removed by the next append. Writers take turns through an advisory lock
on ``<root>/.lock``. Version-1 stores (a manifest and no log) are read as they are.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import resource
import shutil
import threading
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from index.atomic import append_line, fsync_dir, write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
LOG = "manifest.log"
CHECKPOINT_EVERY = 256  # shards recorded in the log before it is folded into the manifest
ARRAYS = ("features", "boxes", "scores", "kinds")
# float16 holds up to 65504; features of a ReLU MLP head stay far below, but a broken
# extractor must not silently write inf.
FLOAT16_MAX = float(np.finfo(np.float16).max)
# Shards kept memory-mapped at once, least recently used unmapped first. Each mapped array
# holds a file descriptor, four per shard, and the service appends one shard per upload:
# unbounded, a few hundred uploads exhaust a 1024-descriptor limit. None: an eighth of the
# process's descriptor limit, at least 128 (remapping a shard costs four opens, so the
# bound should stay above the shards a search touches).
MAX_OPEN_SHARDS: int | None = None


def open_shard_limit() -> int:
    if MAX_OPEN_SHARDS is not None:
        return MAX_OPEN_SHARDS
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(128, soft // 8) if soft != resource.RLIM_INFINITY else 1 << 16


@dataclass(frozen=True)
class _View:
    """One consistent reading of the manifest: shards, total rows, key -> (start, count),
    and each shard's first global row."""

    shards: tuple[dict, ...]
    rows: int
    index: dict[str, tuple[int, int]]
    starts: np.ndarray

    def with_shard(self, shard: dict) -> _View:
        """This view plus one appended shard (a new view; this one is left as it is)."""
        index = dict(self.index)
        index.update((key, (int(start), int(count))) for key, (start, count) in shard["keys"].items())
        return _View((*self.shards, shard), self.rows + int(shard["rows"]), index,
                     np.append(self.starts, self.rows))


class FeatureStoreError(ValueError):
    """A feature store or a record that cannot be used; the message says which and why."""


@dataclass
class RegionRecord:
    """The regions of one image.

    boxes: (n, 4) float32 xyxy in original pixels; scores: (n,) float32 detector scores
    (1.0 for the whole image and given boxes); features: (n, D) float (float16 when read
    from a store, a memory-mapped view); kinds: (n,) int8, 0 whole image, 1 extracted region,
    2 annotation box, 3 given box.
    """

    boxes: np.ndarray
    scores: np.ndarray
    features: np.ndarray
    kinds: np.ndarray

    def __post_init__(self) -> None:
        self.boxes = np.asarray(self.boxes, dtype=np.float32)
        self.scores = np.asarray(self.scores, dtype=np.float32)
        self.kinds = np.asarray(self.kinds, dtype=np.int8)
        if not np.issubdtype(np.asarray(self.features).dtype, np.floating):
            self.features = np.asarray(self.features, dtype=np.float32)
        n = len(self.kinds)
        if self.boxes.shape != (n, 4):
            raise FeatureStoreError(f"boxes have shape {self.boxes.shape}, expected ({n}, 4)")
        if self.scores.shape != (n,):
            raise FeatureStoreError(f"scores have shape {self.scores.shape}, expected ({n},)")
        if self.kinds.ndim != 1:
            raise FeatureStoreError(f"kinds have shape {self.kinds.shape}, expected (n,)")
        if self.features.ndim != 2 or self.features.shape[0] != n:
            raise FeatureStoreError(
                f"features have shape {self.features.shape}, expected ({n}, D)"
            )

    def __len__(self) -> int:
        return len(self.kinds)

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])


class FeatureStore:
    """Append-only, memory-mapped store of :class:`RegionRecord` s, one per key.

    ``dim`` and ``extractor`` (the region extractor's version) are checked against an
    existing store and recorded in a new one; the store itself is created on the first
    append, so opening a path that does not exist yet is fine.
    """

    def __init__(
        self, root: str | Path, dim: int | None = None, extractor: str | None = None
    ) -> None:
        self.root = Path(root)
        self._manifest_path = self.root / MANIFEST
        self._log_path = self.root / LOG
        self._logged = 0  # shard entries in the log, not yet in manifest.json
        self._seen: tuple | None = None  # the files' stat when last read or written by us
        # What readers see: replaced whole, never changed in place, so a search reading rows
        # while an upload appends (and re-reads the manifest) never sees half of a state.
        self._view = _View((), 0, {}, np.zeros(0, dtype=np.int64))
        self._dim = dim
        self._extractor = extractor
        # shard name -> mmapped arrays, least recently used first; a shard's content never
        # changes once it is named, so a cached mapping never goes stale
        self._arrays: OrderedDict[str, dict[str, np.ndarray]] = OrderedDict()
        self._arrays_lock = threading.Lock()
        if self._manifest_path.exists():
            self._load_manifest(dim, extractor)

    # -- reading ------------------------------------------------------------------------

    @property
    def dim(self) -> int | None:
        """D_raw, or None while the store is empty and no dim was given."""
        return self._dim

    @property
    def extractor(self) -> str | None:
        return self._extractor

    def __len__(self) -> int:
        return self._view.rows

    def __contains__(self, key: object) -> bool:
        return key in self._view.index

    def has(self, key: str) -> bool:
        return key in self._view.index

    def keys(self) -> list[str]:
        """Every key, in append order."""
        return list(self._view.index)

    def rows_of(self, key: str) -> tuple[int, int]:
        """(global start row, row count) of ``key``."""
        try:
            return self._view.index[key]
        except KeyError:
            raise KeyError(f"{key!r} is not in the feature store {self.root}") from None

    def get(self, key: str) -> RegionRecord:
        """The record of ``key``; its features are a float16 memory-mapped view."""
        view = self._view
        try:
            start, count = view.index[key]
        except KeyError:
            raise KeyError(f"{key!r} is not in the feature store {self.root}") from None
        shard = int(np.searchsorted(view.starts, start, side="right") - 1)
        arrays = self._open_shard(view.shards[shard])
        local = slice(start - int(view.starts[shard]), start - int(view.starts[shard]) + count)
        return RegionRecord(
            boxes=arrays["boxes"][local],
            scores=arrays["scores"][local],
            features=arrays["features"][local],
            kinds=arrays["kinds"][local],
        )

    def features(self, rows: np.ndarray) -> np.ndarray:
        """(len(rows), D) float32 features of global ``rows``, in the order given."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        view = self._view
        if rows.size and (rows.min() < 0 or rows.max() >= view.rows):
            raise IndexError(f"row out of range 0..{view.rows - 1} in feature store {self.root}")
        out = np.empty((rows.size, self._dim or 0), dtype=np.float32)
        shard_of_row = np.searchsorted(view.starts, rows, side="right") - 1
        # One fancy-index read per shard rather than one per row.
        for shard in np.unique(shard_of_row):
            where = np.flatnonzero(shard_of_row == shard)
            local = rows[where] - view.starts[shard]
            out[where] = self._open_shard(view.shards[int(shard)])["features"][local]
        return out

    def refresh(self) -> bool:
        """Read the manifest again if another process appended since; True when it had.
        A reader (a replica of the service) calls this to see a writer's new records."""
        if not self._manifest_path.exists() or self._files_stat() == self._seen:
            return False
        before = self._view
        self._load_manifest(self._dim, self._extractor)
        return self._view.rows != before.rows

    # -- writing ------------------------------------------------------------------------

    def append(self, key: str, record: RegionRecord) -> tuple[int, int]:
        """Append one record; see :meth:`append_many`."""
        return self.append_many([(key, record)])[key]

    def append_many(
        self, items: Iterable[tuple[str, RegionRecord]]
    ) -> dict[str, tuple[int, int]]:
        """Append records as one new shard; returns each key's (global start, count).

        Refuses (before writing anything) a key already present or repeated, a record whose
        feature dim differs from the store's, and non-finite or float16-overflowing features.
        """
        items = list(items)
        if not items:
            return {}
        self._check_items(items)
        self.root.mkdir(parents=True, exist_ok=True)
        with self._lock():
            # Another process may have appended since we read the files: start from the disk
            # state then (re-reading is O(store); an append of our own is not).
            if self._manifest_path.exists() and self._files_stat() != self._seen:
                self._load_manifest(self._dim, self._extractor)
                self._check_items(items)
            return self._write_shard(items)

    def _check_items(self, items: list[tuple[str, RegionRecord]]) -> None:
        seen: set[str] = set()
        dim = self._dim
        for key, record in items:
            if not isinstance(key, str) or not key:
                raise FeatureStoreError(f"feature store keys are non-empty strings, got {key!r}")
            if key in self._view.index:
                raise FeatureStoreError(
                    f"key {key!r} is already in the feature store {self.root}; "
                    "a key is stored once (skip keys that are present to resume)"
                )
            if key in seen:
                raise FeatureStoreError(f"key {key!r} appears twice in one append")
            seen.add(key)
            if not isinstance(record, RegionRecord):
                raise FeatureStoreError(f"record of {key!r} is a {type(record).__name__}, not a RegionRecord")
            if len(record) == 0:
                raise FeatureStoreError(f"record of {key!r} has no rows (expected at least the whole image)")
            if dim is None:
                dim = record.dim
            elif record.dim != dim:
                raise FeatureStoreError(
                    f"record of {key!r} has features of dim {record.dim}, but the feature store "
                    f"{self.root} holds dim {dim} (a different region extractor?)"
                )
            features = np.asarray(record.features, dtype=np.float32)
            if not np.isfinite(features).all() or np.abs(features).max() > FLOAT16_MAX:
                raise FeatureStoreError(
                    f"record of {key!r} has non-finite features or features beyond float16's "
                    f"range ±{FLOAT16_MAX:g}"
                )

    def _write_shard(self, items: list[tuple[str, RegionRecord]]) -> dict[str, tuple[int, int]]:
        name = f"shard-{len(self._view.shards):06d}"
        final = self.root / name
        if final.exists():
            # Left by a crash between the shard rename and its log line: neither the manifest
            # nor the log named it, so nothing points at its rows.
            log.warning("removing orphan shard %s left by an interrupted append", final)
            shutil.rmtree(final)
        for stale in self.root.glob(".tmp-shard-*"):
            shutil.rmtree(stale, ignore_errors=True)

        start = len(self)
        spans: dict[str, tuple[int, int]] = {}
        offset = start
        for key, record in items:
            spans[key] = (offset, len(record))
            offset += len(record)
        arrays = {
            "features": np.concatenate([np.asarray(r.features, dtype=np.float16) for _, r in items]),
            "boxes": np.concatenate([r.boxes for _, r in items]),
            "scores": np.concatenate([r.scores for _, r in items]),
            "kinds": np.concatenate([r.kinds for _, r in items]),
        }
        tmp = self.root / f".tmp-shard-{uuid.uuid4().hex}"
        tmp.mkdir()
        for array_name, array in arrays.items():
            with open(tmp / f"{array_name}.npy", "wb") as handle:
                np.save(handle, np.ascontiguousarray(array))
                handle.flush()
                os.fsync(handle.fileno())
        fsync_dir(tmp)
        os.rename(tmp, final)
        fsync_dir(self.root)

        dim = int(arrays["features"].shape[1])
        shard = {"name": name, "rows": offset - start, "keys": {k: list(v) for k, v in spans.items()}}
        if self._manifest_path.exists() and self._logged + 1 < CHECKPOINT_EVERY:
            append_line(self._log_path, json.dumps(shard))
            self._logged += 1
        else:  # the first shard, or a full log: everything into a new manifest, the log emptied
            manifest = {
                "version": FORMAT_VERSION,
                "dim": dim,
                "extractor": self._extractor,
                "shards": [*self._view.shards, shard],
            }
            write_json_atomic(self._manifest_path, manifest, indent=None)
            write_text_atomic(self._log_path, "")
            self._logged = 0
        self._seen = self._files_stat()
        self._dim = dim
        self._view = self._view.with_shard(shard)
        log.debug("appended %d records (%d rows) to %s as %s", len(items), offset - start, self.root, name)
        return spans

    # -- manifest -----------------------------------------------------------------------

    def _files_stat(self) -> tuple:
        """What changes whenever any writer records a shard: the manifest's and the log's
        inode, size and modification time."""
        stats = []
        for path in (self._manifest_path, self._log_path):
            try:
                st = path.stat()
                stats.append((st.st_ino, st.st_size, st.st_mtime_ns))
            except FileNotFoundError:
                stats.append(None)
        return tuple(stats)

    def _load_manifest(self, dim: int | None, extractor: str | None) -> None:
        path = self._manifest_path
        seen = self._files_stat()  # before reading: a change while we read is seen next time
        # The log first: a writer folding it into a new manifest between the two reads then
        # leaves us its old lines and the new manifest that holds them too, never less.
        logged = self._read_log()
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise FeatureStoreError(f"{path}: corrupt feature store manifest ({exc})") from exc
        if not isinstance(manifest, dict) or manifest.get("version") not in READABLE_VERSIONS:
            raise FeatureStoreError(
                f"{path}: not a feature store manifest of version {' or '.join(map(str, READABLE_VERSIONS))} "
                f"(version {manifest.get('version') if isinstance(manifest, dict) else None!r})"
            )
        stored_dim = manifest.get("dim")
        if not isinstance(stored_dim, int) or stored_dim < 1:
            raise FeatureStoreError(f"{path}: field 'dim' must be a positive integer, got {stored_dim!r}")
        if dim is not None and dim != stored_dim:
            raise FeatureStoreError(
                f"feature store {self.root} holds features of dim {stored_dim}, expected {dim}"
            )
        stored_extractor = manifest.get("extractor")
        if extractor is not None and stored_extractor is not None and extractor != stored_extractor:
            raise FeatureStoreError(
                f"feature store {self.root} was written by region extractor {stored_extractor[:12]}…, "
                f"not {extractor[:12]}…; use a new folder, or extract again with the same detector"
            )
        shards = manifest.get("shards")
        if not isinstance(shards, list):
            raise FeatureStoreError(f"{path}: field 'shards' must be a list")
        folded = {shard.get("name") for shard in shards if isinstance(shard, dict)}
        logged = [entry for entry in logged if not (isinstance(entry, dict) and entry.get("name") in folded)]
        self._logged = len(logged)
        shards = [*shards, *logged]
        names, starts, index, rows = [], [], {}, 0
        for number, shard in enumerate(shards):
            self._check_shard_entry(number, shard, rows, index)
            names.append(shard)
            starts.append(rows)
            rows += int(shard["rows"])
            index.update((key, (int(start), int(count))) for key, (start, count) in shard["keys"].items())
        self._dim = stored_dim
        self._extractor = stored_extractor if stored_extractor is not None else extractor
        self._view = _View(tuple(names), rows, index, np.asarray(starts, dtype=np.int64))
        self._seen = seen

    def _read_log(self) -> list[object]:
        """The shard entries in the log, in order; a last line without its newline (a crash
        while writing it) is left out."""
        try:
            text = self._log_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        except (OSError, UnicodeDecodeError) as exc:
            raise FeatureStoreError(f"{self._log_path}: unreadable feature store log ({exc})") from exc
        entries = []
        for number, line in enumerate(text.split("\n")[:-1], start=1):
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise FeatureStoreError(f"{self._log_path}: line {number} is not JSON ({exc})") from exc
        return entries

    def _check_shard_entry(self, number: int, shard: object, start: int, index: dict) -> None:
        where = f"{self._manifest_path}: shards[{number}]"
        if not isinstance(shard, dict) or not {"name", "rows", "keys"} <= shard.keys():
            raise FeatureStoreError(f"{where} must have fields name, rows and keys")
        if not isinstance(shard["rows"], int) or not isinstance(shard["keys"], dict):
            raise FeatureStoreError(f"{where}: rows must be an integer and keys an object")
        covered = 0
        for key, span in shard["keys"].items():
            if not (isinstance(span, list) and len(span) == 2 and all(isinstance(v, int) for v in span)):
                raise FeatureStoreError(f"{where}: key {key!r} must map to [start, count]")
            if span[0] != start + covered or key in index:
                raise FeatureStoreError(f"{where}: key {key!r} has an inconsistent row span {span}")
            covered += span[1]
        if covered != shard["rows"]:
            raise FeatureStoreError(f"{where}: keys cover {covered} rows, the shard says {shard['rows']}")
        if not (self.root / shard["name"]).is_dir():
            raise FeatureStoreError(f"{where}: shard folder {self.root / shard['name']} is missing")

    def _open_shard(self, shard: dict) -> dict[str, np.ndarray]:
        name = shard["name"]
        with self._arrays_lock:
            arrays = self._arrays.get(name)
            if arrays is not None:
                self._arrays.move_to_end(name)
                return arrays
        folder = self.root / name
        arrays = {}
        for array_name in ARRAYS:
            path = folder / f"{array_name}.npy"
            try:
                arrays[array_name] = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as exc:
                raise FeatureStoreError(f"{path}: cannot read shard array ({exc})") from exc
            if len(arrays[array_name]) != shard["rows"]:
                raise FeatureStoreError(
                    f"{path}: has {len(arrays[array_name])} rows, the manifest says {shard['rows']}"
                )
        if arrays["features"].shape[1:] != (self._dim,):
            raise FeatureStoreError(
                f"{folder / 'features.npy'}: shape {arrays['features'].shape}, expected (n, {self._dim})"
            )
        with self._arrays_lock:
            self._arrays[name] = arrays
            limit = open_shard_limit()
            while len(self._arrays) > limit:
                # Unmapped (and its descriptors closed) once no caller holds a view of it.
                self._arrays.popitem(last=False)
        return arrays

    @contextmanager
    def _lock(self) -> Iterator[None]:
        with open(self.root / ".lock", "a") as handle:
            # Blocks while another writer appends; the manifest is re-read once we hold it.
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
