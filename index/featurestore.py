"""Raw region features on disk: append-only shards of .npy files, a JSON manifest and a log.

Layout (see docs/ARCHITECTURE.md)::

    <root>/manifest.json   {"version": 2, "dim": D_raw, "extractor": "<sha256>",
                            "shards": [{"name", "rows", "keys": {key: [start, count]}}]}
    <root>/manifest.log    the shards appended since: one {"name", "rows", "keys"} per line
    <root>/shard-000000/   features.npy (n, D) float16, boxes.npy (n, 4) float32,
                           scores.npy (n,) float32, kinds.npy (n,) int8
    <root>/shard-000000-000255/   the same, for shards 0 to 255 merged by :meth:`compact`

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

The service appends one small shard per upload, so shards pile up; :meth:`compact` merges
runs of small consecutive shards into shards of about ``COMPACT_ROWS`` rows (global rows do
not move) and swaps them in with one manifest replace, so opening the store costs what its
keys cost, not what the number of shards ever written does. :meth:`refresh` reads only the
log lines written since it last looked, unless the manifest itself was replaced.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import resource
import shutil
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Container, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from index.atomic import append_line, fsync_dir, write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
LOG = "manifest.log"
CHECKPOINT_EVERY = 256  # shards recorded in the log before it is folded into the manifest
RECENT_KEYS = 4096  # keys appended since the last whole read, before they join the rest
COMPACT_ROWS = 65_536  # rows of a merged shard: 64 MiB of features at D_raw 512
SHARD_NAME = re.compile(r"shard-(\d+)(?:-(\d+))?")  # shard-<first>[-<last>] append numbers
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
    and each shard's first global row. The keys are two dicts, those of the last whole read
    and those appended since, so that an append copies only the short one."""

    shards: tuple[dict, ...]
    rows: int
    index: dict[str, tuple[int, int]]
    starts: np.ndarray
    recent: dict[str, tuple[int, int]] = field(default_factory=dict)

    def span(self, key: str) -> tuple[int, int] | None:
        return self.recent.get(key) or self.index.get(key)

    def __contains__(self, key: object) -> bool:
        return key in self.recent or key in self.index

    def keys(self) -> list[str]:
        return [*self.index, *self.recent]

    def with_shard(self, shard: dict) -> _View:
        """This view plus one appended shard (a new view; this one is left as it is)."""
        recent = {**self.recent, **{key: (int(start), int(count))
                                    for key, (start, count) in shard["keys"].items()}}
        index = self.index
        if len(recent) > RECENT_KEYS:  # one copy of every key per RECENT_KEYS appended
            index, recent = {**index, **recent}, {}
        return _View((*self.shards, shard), self.rows + int(shard["rows"]), index,
                     np.append(self.starts, self.rows), recent)


class FeatureStoreError(ValueError):
    """A feature store or a record that cannot be used; the message says which and why."""


class _ShardGone(FeatureStoreError):
    """A shard folder the view names was removed: a compaction merged it since."""


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
        self._log_read = 0  # bytes of the log read so far (whole lines)
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
        return key in self._view

    def has(self, key: str) -> bool:
        return key in self._view

    def keys(self) -> list[str]:
        """Every key, in append order."""
        return self._view.keys()

    def rows_of(self, key: str) -> tuple[int, int]:
        """(global start row, row count) of ``key``."""
        span = self._view.span(key)
        if span is None:
            raise KeyError(f"{key!r} is not in the feature store {self.root}")
        return span

    def get(self, key: str) -> RegionRecord:
        """The record of ``key``; its features are a float16 memory-mapped view."""
        return self._reading(lambda view: self._get(view, key))

    def _get(self, view: _View, key: str) -> RegionRecord:
        span = view.span(key)
        if span is None:
            raise KeyError(f"{key!r} is not in the feature store {self.root}")
        start, count = span
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
        return self._reading(lambda view: self._features(view, rows))

    def _features(self, view: _View, rows: np.ndarray) -> np.ndarray:
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

    def _reading(self, read: Callable[[_View], object]):  # -> what ``read`` returns
        """``read(view)``; when a compaction (here or in another process) merged away a shard
        the view names, read again from the manifest on disk: the same rows, other shards."""
        view = self._view
        try:
            return read(view)
        except _ShardGone:
            if self._view is view:
                self._load_manifest(self._dim, self._extractor)
            return read(self._view)

    def refresh(self) -> bool:
        """Read what another process appended (or compacted) since; True when the rows
        changed. A reader (a replica of the service) calls this to see a writer's new
        records. Only the new log lines are read, unless the manifest was replaced."""
        if not self._manifest_path.exists():
            return False
        seen = self._files_stat()
        if seen == self._seen:
            return False
        before = self._view
        if not self._read_log_tail(seen):
            self._load_manifest(self._dim, self._extractor)
        return self._view.rows != before.rows

    def _read_log_tail(self, seen: tuple) -> bool:
        """Add the shards of the log lines written since we last read it, when only the log
        grew (same manifest, same log file); False when a whole re-read is needed."""
        if self._seen is None or seen[0] != self._seen[0] or seen[1] is None or self._seen[1] is None:
            return False
        if seen[1][0] != self._seen[1][0] or seen[1][1] < self._log_read:  # a new or shorter log
            return False
        with open(self._log_path, "rb") as handle:
            handle.seek(self._log_read)
            tail = handle.read()
        whole = tail[: tail.rfind(b"\n") + 1]  # a line still being written waits
        view = self._view
        for line in whole.decode("utf-8").splitlines():
            try:
                shard = json.loads(line)
            except json.JSONDecodeError as exc:
                raise FeatureStoreError(f"{self._log_path}: a line is not JSON ({exc})") from exc
            self._check_shard_entry(len(view.shards), shard, view.rows, view)
            view = view.with_shard(shard)
            self._logged += 1
        self._log_read += len(whole)
        self._view, self._seen = view, seen
        return True

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
            # state then (its new log lines; the whole manifest only after a fold).
            before = self._view
            self.refresh()
            if self._view is not before:
                self._check_items(items)
            return self._write_shard(items)

    def _check_items(self, items: list[tuple[str, RegionRecord]]) -> None:
        seen: set[str] = set()
        dim = self._dim
        for key, record in items:
            if not isinstance(key, str) or not key:
                raise FeatureStoreError(f"feature store keys are non-empty strings, got {key!r}")
            if key in self._view:
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
        name = f"shard-{_next_number(self._view.shards):06d}"
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
        self._write_folder(arrays, self.root / f".tmp-shard-{uuid.uuid4().hex}", final)

        dim = int(arrays["features"].shape[1])
        shard = {"name": name, "rows": offset - start, "keys": {k: list(v) for k, v in spans.items()}}
        if self._manifest_path.exists() and self._logged + 1 < CHECKPOINT_EVERY:
            append_line(self._log_path, json.dumps(shard))
            self._logged += 1
            self._log_read = self._log_path.stat().st_size  # we hold the lock: ours is the last line
        else:  # the first shard, or a full log: everything into a new manifest, the log emptied
            self._write_manifest([*self._view.shards, shard], dim)
        self._seen = self._files_stat()
        self._dim = dim
        self._view = self._view.with_shard(shard)
        log.debug("appended %d records (%d rows) to %s as %s", len(items), offset - start, self.root, name)
        return spans

    @staticmethod
    def _write_folder(arrays: dict[str, np.ndarray], tmp: Path, final: Path) -> None:
        """Write ``arrays`` as .npy files into ``tmp``, fsynced, then rename it to ``final``."""
        tmp.mkdir()
        for array_name, array in arrays.items():
            with open(tmp / f"{array_name}.npy", "wb") as handle:
                np.save(handle, np.ascontiguousarray(array))
                handle.flush()
                os.fsync(handle.fileno())
        fsync_dir(tmp)
        os.rename(tmp, final)
        fsync_dir(final.parent)

    def _write_manifest(self, shards: list[dict], dim: int) -> None:
        """Everything into a new manifest.json, then the log emptied (the caller holds the
        lock). A crash between the two leaves log lines that the manifest holds too: a
        reader skips them by their rows."""
        manifest = {"version": FORMAT_VERSION, "dim": dim, "extractor": self._extractor,
                    "shards": shards}
        write_json_atomic(self._manifest_path, manifest, indent=None)
        write_text_atomic(self._log_path, "")
        self._logged = self._log_read = 0

    # -- compaction ---------------------------------------------------------------------

    def compact(
        self, *, target_rows: int = COMPACT_ROWS,
        progress: Callable[[int, int], None] | None = None,
    ) -> tuple[int, int]:
        """Merge each run of consecutive shards smaller than ``target_rows`` into shards of
        at most ``target_rows`` rows; returns (shards before, shards after).

        Global rows, keys and contents stay as they are. The merged shards are written
        beside the old ones without holding the writers' lock (appends go on), then swapped
        in by one manifest replace under the lock; the old folders go last. A crash leaves
        the old state, or the new one with leftover folders that the next compaction
        removes. A reader holding the old view re-reads the manifest when it meets a shard
        that went. ``progress(done, total)`` is called after each merged shard."""
        if target_rows < 1:
            raise FeatureStoreError(f"target_rows must be positive, got {target_rows}")
        if not self._manifest_path.exists():
            return 0, 0
        with self._lock(".compact.lock"):  # one compaction at a time; appends go on
            self.refresh()
            view = self._view
            groups = _merge_groups(view.shards, target_rows)
            for stale in self.root.glob(".tmp-compact-*"):
                shutil.rmtree(stale, ignore_errors=True)
            merged = []
            for done, group in enumerate(groups, start=1):
                merged.append(self._write_merged(group))
                if progress is not None:
                    progress(done, len(groups))
            with self._lock():
                self._load_manifest(self._dim, self._extractor)
                shards = _replace_groups(list(self._view.shards), groups, merged)
                if groups:
                    self._write_manifest(shards, self._dim or 0)
                    self._load_manifest(self._dim, self._extractor)
                named = {shard["name"] for shard in self._view.shards}
                # Under the lock no append is between its rename and its log line, so every
                # shard folder the manifest does not name is left over: merged away, or
                # written by a compaction that crashed before its manifest replace.
                leftovers = [path for path in self.root.glob("shard-*") if path.name not in named]
        for path in leftovers:
            shutil.rmtree(path, ignore_errors=True)
        log.info("compacted %s: %d shards -> %d (%d merged into %d); %d old folders removed",
                 self.root, len(view.shards), len(self._view.shards), sum(map(len, groups)),
                 len(groups), len(leftovers))
        return len(view.shards), len(self._view.shards)

    def _write_merged(self, group: list[dict]) -> dict:
        """One shard holding the rows of ``group`` (consecutive shards), in order."""
        first, last = _numbers(group[0]["name"])[0], _numbers(group[-1]["name"])[1]
        final = self.root / f"shard-{first:06d}-{last:06d}"
        if final.exists():  # from a compaction that crashed before its manifest replace
            shutil.rmtree(final)
        parts = [self._open_shard(shard) for shard in group]
        arrays = {name: np.concatenate([part[name] for part in parts]) for name in ARRAYS}
        self._write_folder(arrays, self.root / f".tmp-compact-{uuid.uuid4().hex}", final)
        keys: dict[str, list[int]] = {}
        for shard in group:
            keys.update(shard["keys"])
        return {"name": final.name, "rows": sum(int(shard["rows"]) for shard in group), "keys": keys}

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
        # Lines the manifest holds already (a crash between a new manifest and the emptied
        # log) start below the rows it covers; rows only grow, whatever compaction did.
        folded = sum(shard.get("rows", 0) for shard in shards if isinstance(shard, dict))
        logged = [entry for entry in logged if not _first_row(entry) < folded]
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
        with self._arrays_lock:  # unmap shards merged away: their files are gone from disk
            named = {shard["name"] for shard in names}
            for name in [name for name in self._arrays if name not in named]:
                del self._arrays[name]

    def _read_log(self) -> list[object]:
        """The shard entries in the log, in order; a last line without its newline (a crash
        while writing it) is left out."""
        try:
            data = self._log_path.read_bytes()
            text = data[: data.rfind(b"\n") + 1].decode("utf-8")
        except FileNotFoundError:
            self._log_read = 0
            return []
        except (OSError, UnicodeDecodeError) as exc:
            raise FeatureStoreError(f"{self._log_path}: unreadable feature store log ({exc})") from exc
        self._log_read = len(text.encode("utf-8"))
        entries = []
        for number, line in enumerate(text.split("\n")[:-1], start=1):
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise FeatureStoreError(f"{self._log_path}: line {number} is not JSON ({exc})") from exc
        return entries

    def _check_shard_entry(self, number: int, shard: object, start: int, index: Container[str]) -> None:
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
            except FileNotFoundError as exc:
                raise _ShardGone(f"{path}: shard gone (merged by a compaction?)") from exc
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
    def _lock(self, name: str = ".lock") -> Iterator[None]:
        with open(self.root / name, "a") as handle:
            # Blocks while another writer appends; the manifest is re-read once we hold it.
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


def _numbers(name: str) -> tuple[int, int]:
    """(first, last) append numbers a shard folder's name holds."""
    match = SHARD_NAME.fullmatch(name)
    if match is None:
        raise FeatureStoreError(f"shard name {name!r} is not shard-<number>[-<number>]")
    first = int(match.group(1))
    return first, int(match.group(2) or first)


def _next_number(shards: tuple[dict, ...]) -> int:
    """The number of the next appended shard: one past the last, whatever was merged."""
    return _numbers(shards[-1]["name"])[1] + 1 if shards else 0


def _first_row(entry: object) -> float:
    """The first global row of a log entry; +inf when it has none (left for the checks)."""
    if isinstance(entry, dict) and isinstance(entry.get("keys"), dict) and entry["keys"]:
        spans = [span[0] for span in entry["keys"].values() if isinstance(span, list) and span]
        if spans and all(isinstance(start, int) for start in spans):
            return min(spans)
    return float("inf")


def _merge_groups(shards: tuple[dict, ...], target_rows: int) -> list[list[dict]]:
    """Runs of two or more consecutive shards, each run at most ``target_rows`` rows; a
    shard of ``target_rows`` or more stays alone."""
    groups: list[list[dict]] = []
    run: list[dict] = []
    rows = 0
    for shard in shards:
        if rows + int(shard["rows"]) > target_rows:
            if len(run) > 1:
                groups.append(run)
            run, rows = [], 0
        if int(shard["rows"]) < target_rows:
            run.append(shard)
            rows += int(shard["rows"])
    if len(run) > 1:
        groups.append(run)
    return groups


def _replace_groups(shards: list[dict], groups: list[list[dict]], merged: list[dict]) -> list[dict]:
    """``shards`` with each group's run replaced by its merged shard."""
    position = {shard["name"]: number for number, shard in enumerate(shards)}
    for group, replacement in sorted(zip(groups, merged, strict=True),
                                     key=lambda pair: -position[pair[0][0]["name"]]):
        start = position[group[0]["name"]]
        if [shard["name"] for shard in shards[start:start + len(group)]] != [s["name"] for s in group]:
            raise FeatureStoreError(f"{group[0]['name']}…: the shards to merge changed meanwhile")
        shards[start:start + len(group)] = [replacement]
    return shards
