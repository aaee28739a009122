"""The index lifecycle: the two FAISS indexes (fragments and phrases) of one model version.

The indexes reflect a position in the change log (:mod:`app.services.changes`). Every
process brings them forward the same way, :meth:`Indexes.catch_up`: the writer after its
own commit, a replica every ``index_sync_seconds``, any process at start. Nothing on the
request path writes them to disk: a snapshot (:meth:`Indexes.save_snapshot`, called by the
service's background thread, at shutdown and by the commands) saves both with the position
they reflect. At start each index loads its snapshot when the model version matches, then
the log past the snapshot is replayed; only an index without a usable snapshot is rebuilt
from the feature store (raw features need no image: a new checkpoint only re-projects them),
beside the serving one and swapped in when complete.

Crash safety: the database is the truth and holds the log; the feature store is written
before the commit that names its rows; a snapshot is written atomically with its position.
Whatever was killed when, a restart loads a snapshot at some position and replays the rest.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.models import Fragment, IndexBuild, Phrase
from app.services import changes
from app.services.index_vectors import (
    ENCODE_BATCH,
    all_fragment_vectors,
    all_phrase_vectors,
    fragment_vectors,
    phrase_vectors,
)
from index.atomic import file_lock
from index.featurestore import FeatureStore
from index.vectors import DEFAULT_MEMORY_BUDGET, VectorIndex, VectorIndexError, read_manifest

if TYPE_CHECKING:
    from models.encoder import Encoder  # pulls in torch

log = logging.getLogger(__name__)

REPLAY_BATCH = 1000  # log entries read and applied at once
INDEXES = ("fragments", "phrases")
SNAPSHOT_LOCK = ".snapshot.lock"  # in the index folder: one snapshot writer, readers wait


def end_read(session: Session) -> None:
    """End the session's read-only transaction, so that the next read sees what others have
    committed since (SQLite's WAL and PostgreSQL keep a snapshot per transaction) and no
    connection idles inside a transaction. A session holding unsaved changes is left alone."""
    if not (session.new or session.dirty or session.deleted):
        session.rollback()


class Indexes:
    """The fragment and phrase indexes of one model; ``indexes["fragments"]`` is the serving
    :class:`~index.vectors.VectorIndex`. Searches may run while one writer updates.
    ``snapshots``: whether this process saves snapshots (off for a replica that shares its
    index folder with a writer)."""

    def __init__(self, *, encoder: Encoder, model_version: str, store: FeatureStore,
                 index_dir: str | Path, memory_budget: int = DEFAULT_MEMORY_BUDGET,
                 snapshots: bool = True) -> None:
        self.encoder = encoder
        self.memory_budget = memory_budget  # bytes an index may take: picks its kind
        self.model_version = model_version
        self.store = store
        self.index_dir = Path(index_dir)
        self.snapshots = snapshots
        self._by_name: dict[str, VectorIndex] = {name: VectorIndex(encoder.dim) for name in INDEXES}
        self.position = 0  # the log position both indexes reflect
        self._stamp: str | None = None  # when that change was committed (changes.stamp_of)
        self.saved_position = 0  # the newest snapshot's position (the log is pruned behind it)
        # batches applied since that snapshot: (last position, monotonic time applied, changes)
        self._unsaved: list[tuple[int, float, int]] = []
        self._write_lock = threading.Lock()  # one index writer at a time (updates, rebuilds)

    def __getitem__(self, name: str) -> VectorIndex:
        return self._by_name[name]

    def fragment_count(self) -> int:
        return len(self._by_name["fragments"])

    def phrase_count(self) -> int:
        return len(self._by_name["phrases"])

    # -- start ----------------------------------------------------------------------------

    def start(self, session: Session, *, rebuild: bool = False) -> dict[str, str]:
        """Load each index's snapshot when it suits this model and database, rebuild the
        others, then replay the log past the snapshots. Returns per index "loaded" or
        "rebuilt"."""
        outcome, positions = {}, {}
        for name in INDEXES:
            reason = "a rebuild was asked for" if rebuild else self._load_snapshot(session, name)
            if isinstance(reason, int):
                positions[name], outcome[name] = reason, "loaded"
                continue
            log.info("rebuilding the %s index: %s", name, reason)
            outcome[name] = "rebuilt"
        end_read(session)
        if positions:
            self.position = self.saved_position = min(positions.values())
            self._stamp = changes.stamp_of(session, self.position)
        stale = [name for name, done in outcome.items() if done == "rebuilt"]
        if stale:
            self.rebuild(session, only=stale)
        started = time.perf_counter()
        replayed = self.catch_up(session)
        log.info("replayed %d changes of the log in %.2f s: the indexes are at position %d "
                 "(%d fragments, %d phrases)", replayed, time.perf_counter() - started,
                 self.position, self.fragment_count(), self.phrase_count())
        return outcome

    def _load_snapshot(self, session: Session, name: str) -> int | str:
        """Load the saved index ``name``; returns the log position it reflects, or why it
        cannot serve (a string)."""
        folder = self.index_dir / name
        with file_lock(self.index_dir / SNAPSHOT_LOCK, shared=True):  # no snapshot half-replaced
            try:
                manifest = read_manifest(folder)
                if manifest is None:
                    return "no saved index"
                state = manifest["state"]
                if manifest["model_version"] != self.model_version:
                    return "another model version"
                if not isinstance(state.get("log_position"), int):
                    return "saved before the change log"
                if changes.stamp_of(session, state["log_position"]) != state.get("log_stamp"):
                    return f"saved at log position {state['log_position']} of another database"
                self._by_name[name] = VectorIndex.load(folder)
            except VectorIndexError as exc:
                log.warning("ignoring the %s index: %s", name, exc)
                return str(exc)
        log.info("loaded the %s index (%d vectors, log position %d) from %s", name,
                 len(self._by_name[name]), state["log_position"], folder)
        return state["log_position"]

    def rebuild(self, session: Session, *, only: Sequence[str] = INDEXES,
                progress: bool = False) -> None:
        """Encode every fragment and phrase again, build new indexes beside the serving ones,
        then swap them in and save them. The log position (never below the pruned horizon) is
        read before the rows, which so reflect at least it (replays are idempotent)."""
        with self._write_lock:
            build = IndexBuild(model_version=self.model_version, state="building")
            session.add(build)
            session.commit()
            try:
                position = max(changes.latest_position(session), changes.pruned_through(session))
                stamp = changes.stamp_of(session, position)
                built = {}
                for name in only:
                    ids, vectors = (
                        all_fragment_vectors(session, self.encoder, self.store, progress)
                        if name == "fragments" else all_phrase_vectors(session, self.encoder, progress))
                    built[name] = VectorIndex.build(ids, vectors, dim=self.encoder.dim,
                                                    memory_budget=self.memory_budget)
                self._by_name.update(built)  # the swap: searches from now on see the new ones
                whole = set(only) == set(INDEXES)
                if whole:
                    self.position, self._stamp, self._unsaved = position, stamp, []
                if self.snapshots:
                    self._write_snapshot(built, position, stamp)
                    if whole:
                        self.saved_position = position
            except BaseException:
                session.rollback()
                build.state, build.finished_at = "failed", datetime.now(UTC)
                session.commit()
                raise
            build.state, build.finished_at = "ready", datetime.now(UTC)
            build.fragment_count, build.phrase_count = self.fragment_count(), self.phrase_count()
            session.commit()
        log.info("index build %d: %d fragments, %d phrases", build.id, build.fragment_count,
                 build.phrase_count)

    # -- the log --------------------------------------------------------------------------

    def catch_up(self, session: Session) -> int:
        """Apply every change the log holds past our position, in order; returns how many.
        Idempotent, and the same for the writer (after its commit), replicas and a start.
        Were rows we never applied pruned, the indexes are rebuilt from the database."""
        applied = 0
        with self._write_lock:
            while True:
                entries = changes.read_changes(session, self.position, REPLAY_BATCH)
                horizon = changes.pruned_past(session, self.position, entries)
                if horizon or not entries:
                    break
                self._apply(session, changes.coalesce(entries))
                self.position, self._stamp = entries[-1].position, entries[-1].created_at.isoformat()
                if self.snapshots:  # a process that never saves keeps no account
                    self._unsaved.append((self.position, time.monotonic(), len(entries)))
                applied += len(entries)
                if len(entries) < REPLAY_BATCH:
                    break
        end_read(session)
        if horizon:
            log.warning("the indexes are at log position %d but the log was pruned through %d: "
                        "rebuilding", self.position, horizon)
            self.store.refresh()  # a replica's store may not know the writer's newer rows
            self.rebuild(session)
        return applied

    def _apply(self, session: Session, change: changes.Coalesced) -> None:
        """Drop every id the change names, then add the added ones whose rows still exist
        (none when a later change deleted them again). Adding an id replaces its vector,
        so the ids added are not dropped first: one pass over a flat index, not two."""
        for name, removed, added in (("fragments", change.removed_fragments, change.added_fragments),
                                     ("phrases", change.removed_phrases, change.added_phrases)):
            ids, vectors = self._existing_vectors(session, name, added)
            self._by_name[name].remove(np.setdiff1d(np.asarray(removed, dtype=np.int64), ids))
            self._by_name[name].add(ids, vectors)

    def _existing_vectors(self, session: Session, name: str,
                          wanted: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """The ids of ``wanted`` whose fragment (or phrase) rows exist, and their vectors."""
        ids, vectors = [], []
        for start in range(0, len(wanted), ENCODE_BATCH):
            chunk = wanted[start:start + ENCODE_BATCH]
            if name == "fragments":
                rows = session.execute(select(Fragment.id, Fragment.region_rows)
                                       .where(Fragment.id.in_(chunk)).order_by(Fragment.id)).all()
                if rows:
                    self._have_rows(rows)
                    vectors.append(fragment_vectors(self.encoder, self.store, [r.region_rows for r in rows]))
            else:
                rows = session.execute(select(Phrase.id, Phrase.text)
                                       .where(Phrase.id.in_(chunk)).order_by(Phrase.id)).all()
                if rows:
                    vectors.append(phrase_vectors(self.encoder, [r.text for r in rows]))
            ids.extend(r.id for r in rows)
        return (np.asarray(ids, dtype=np.int64),
                np.concatenate(vectors) if vectors else np.zeros((0, self.encoder.dim), np.float32))

    def _have_rows(self, fragments: Sequence) -> None:
        """Make sure the feature store holds the fragments' rows: another process appended
        them before its commit, so a re-read of the store's manifest finds them."""
        needed = max(max(f.region_rows) for f in fragments)
        if needed >= len(self.store) and not (self.store.refresh() and needed < len(self.store)):
            raise RuntimeError(
                f"fragment {fragments[0].id} names feature-store row {needed}, but the store at "
                f"{self.store.root} holds {len(self.store)} rows: every process must read the "
                "feature store the writers append to")

    def lag(self, session: Session) -> changes.Lag:
        """The log position applied, the database's newest, and how far behind that is."""
        behind = changes.lag(session, self.position)
        end_read(session)
        return behind

    # -- snapshots ------------------------------------------------------------------------

    def unsaved(self) -> tuple[int, float]:
        """Changes applied since the newest snapshot, and seconds since the oldest was applied."""
        with self._write_lock:
            count = sum(n for _, _, n in self._unsaved)
            first = self._unsaved[0][1] if self._unsaved else None
        return count, time.monotonic() - first if first is not None else 0.0

    def save_snapshot(self) -> bool:
        """Save both indexes with the log position they reflect, when changes were applied
        since the newest snapshot; False when there was nothing to save. The indexes are
        copied in memory under the write lock and written after it, so uploads wait for a
        copy, not for the disk."""
        with self._write_lock:
            position, stamp = self.position, self._stamp
            if position == self.saved_position or not self.snapshots:
                return False
            copies = {name: index.copy() for name, index in self._by_name.items()}
        self._write_snapshot(copies, position, stamp)
        with self._write_lock:
            self.saved_position = max(self.saved_position, position)
            self._unsaved = [batch for batch in self._unsaved if batch[0] > position]
        return True

    def _write_snapshot(self, indexes: dict[str, VectorIndex], position: int, stamp: str | None) -> None:
        """Save ``indexes`` at ``position``, unless a snapshot of this model at that position
        or a later one is there already (another process sharing the folder saved it): two
        processes never replace each other's newer snapshot or delete its file."""
        with file_lock(self.index_dir / SNAPSHOT_LOCK):
            for name, index in indexes.items():
                try:
                    manifest = read_manifest(self.index_dir / name)
                except VectorIndexError:
                    manifest = None
                if (manifest is not None and manifest["model_version"] == self.model_version
                        and isinstance(manifest["state"].get("log_position"), int)
                        and manifest["state"]["log_position"] >= position):
                    continue
                index.save(self.index_dir / name, model_version=self.model_version,
                           state={"log_position": position, "log_stamp": stamp})
