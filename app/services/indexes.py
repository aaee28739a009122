"""The index lifecycle: the two FAISS indexes (fragments and phrases) of one model version.

At start each index whose manifest names the current model version and the current database
state is loaded; the others are rebuilt from the feature store (raw features need no image:
a new checkpoint only re-projects them). Ingestion tells the indexes which ids changed
(:class:`IndexChange`, :meth:`Indexes.apply_change`): they are updated in place and saved, no
rebuild. A rebuild is built beside the serving index and swapped in when complete. Another
process's saved indexes are picked up by :meth:`Indexes.sync`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.db.models import Fragment, IndexBuild, Phrase
from index.featurestore import FeatureStore
from index.vectors import DEFAULT_MEMORY_BUDGET, VectorIndex, VectorIndexError, read_manifest

if TYPE_CHECKING:
    from models.encoder import Encoder  # pulls in torch

log = logging.getLogger(__name__)

ENCODE_BATCH = 512  # fragments or phrases encoded per forward pass while building
INDEXES = ("fragments", "phrases")


@dataclass
class IndexChange:
    """Database ids whose vectors an index must add or drop after a committed change."""

    added_fragments: list[int] = field(default_factory=list)
    removed_fragments: list[int] = field(default_factory=list)
    added_phrases: list[int] = field(default_factory=list)
    removed_phrases: list[int] = field(default_factory=list)


def database_state(session: Session) -> dict[str, list[int]]:
    """What the indexes must reflect: (count, max id, id sum) of fragments and of phrases.

    Ids are never reused (see app.db.models), so any insert or delete changes the triple.
    """
    state = {}
    for name, column in (("fragments", Fragment.id), ("phrases", Phrase.id)):
        count, max_id, id_sum = session.execute(
            select(func.count(column), func.max(column), func.sum(column))
        ).one()
        state[name] = [int(count), int(max_id or 0), int(id_sum or 0)]
    end_read(session)
    return state


def end_read(session: Session) -> None:
    """End the session's read-only transaction, so that the next read sees what others have
    committed since (SQLite's WAL and PostgreSQL keep a snapshot per transaction) and no
    connection idles inside a transaction. A session holding unsaved changes is left alone."""
    if not (session.new or session.dirty or session.deleted):
        session.rollback()


class Indexes:
    """The fragment and phrase indexes of one model; ``indexes["fragments"]`` is the serving
    :class:`~index.vectors.VectorIndex`. Searches may run while one writer updates."""

    def __init__(self, *, encoder: Encoder, model_version: str, store: FeatureStore,
                 index_dir: str | Path, memory_budget: int = DEFAULT_MEMORY_BUDGET) -> None:
        self.encoder = encoder
        self.memory_budget = memory_budget  # bytes an index may take: picks its kind
        self.model_version = model_version
        self.store = store
        self.index_dir = Path(index_dir)
        self._by_name: dict[str, VectorIndex] = {name: VectorIndex(encoder.dim) for name in INDEXES}
        # the database state each index reflects (see database_state), for sync()
        self.states: dict[str, list[int]] = {}
        self._write_lock = threading.Lock()  # one index writer at a time (updates, rebuilds)

    def __getitem__(self, name: str) -> VectorIndex:
        return self._by_name[name]

    def fragment_count(self) -> int:
        return len(self._by_name["fragments"])

    def phrase_count(self) -> int:
        return len(self._by_name["phrases"])

    def start(self, session: Session, *, rebuild: bool = False) -> dict[str, str]:
        """Load each index whose manifest matches the model and the database, else rebuild
        it. Returns what happened per index: "loaded" or "rebuilt"."""
        state = database_state(session)
        outcome = {}
        for name in INDEXES:
            try:
                reason = "a rebuild was asked for" if rebuild else self._stale(name, state[name])
            except VectorIndexError as exc:
                log.warning("ignoring the %s index: %s", name, exc)
                reason = "no saved index"
            if reason is None:
                try:
                    self._by_name[name] = VectorIndex.load(self.index_dir / name)
                    self.states[name] = state[name]
                    outcome[name] = "loaded"
                    log.info("loaded the %s index (%d vectors) from %s", name,
                             len(self._by_name[name]), self.index_dir / name)
                    continue
                except VectorIndexError as exc:
                    reason = str(exc)
            log.info("rebuilding the %s index: %s", name, reason)
            outcome[name] = "rebuilt"
        stale = [name for name, done in outcome.items() if done == "rebuilt"]
        if stale:
            self.rebuild(session, only=stale)
        return outcome

    def _stale(self, name: str, state: list[int]) -> str | None:
        """Why the saved index ``name`` cannot serve the database ``state``; None if it can.
        VectorIndexError when its manifest is unreadable."""
        manifest = read_manifest(self.index_dir / name)
        return ("no saved index" if manifest is None
                else "another model version" if manifest["model_version"] != self.model_version
                else "the database changed" if manifest["state"] != {name: state}
                else None)

    def rebuild(self, session: Session, *, only: Sequence[str] = INDEXES,
                progress: bool = False) -> None:
        """Encode every fragment and phrase again, build new indexes beside the serving ones,
        then swap them in and save them."""
        with self._write_lock:
            build = IndexBuild(model_version=self.model_version, state="building")
            session.add(build)
            session.commit()
            try:
                state = database_state(session)
                built = {}
                for name in only:
                    ids, vectors = (self._all_fragment_vectors(session, progress) if name == "fragments"
                                    else self._all_phrase_vectors(session, progress))
                    built[name] = VectorIndex.build(ids, vectors, dim=self.encoder.dim,
                                                    memory_budget=self.memory_budget)
                self._by_name.update(built)  # the swap: searches from now on see the new ones
                self._save(state, only)
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

    def apply_change(self, session: Session, change: IndexChange) -> None:
        """Add and drop the vectors of a committed ingest or delete (no rebuild)."""
        with self._write_lock:
            fragments, phrases = self._by_name["fragments"], self._by_name["phrases"]
            fragments.remove(np.asarray(change.removed_fragments, dtype=np.int64))
            phrases.remove(np.asarray(change.removed_phrases, dtype=np.int64))
            if change.added_fragments:
                rows = session.execute(
                    select(Fragment.id, Fragment.region_rows)
                    .where(Fragment.id.in_(change.added_fragments)).order_by(Fragment.id)
                ).all()
                if rows:  # none when a later change already deleted them again
                    fragments.add(np.array([r.id for r in rows], dtype=np.int64),
                                  self._pooled_fragments([r.region_rows for r in rows]))
            if change.added_phrases:
                rows = session.execute(
                    select(Phrase.id, Phrase.text).where(Phrase.id.in_(change.added_phrases))
                    .order_by(Phrase.id)
                ).all()
                if rows:
                    phrases.add(np.array([r.id for r in rows], dtype=np.int64),
                                self._pooled_phrases([r.text for r in rows]))
            self._save(database_state(session))

    def sync(self, session: Session) -> list[str]:
        """Catch up with what another process committed and saved (a writer replica,
        `artalign ingest`): re-read the feature store's manifest and load each saved index
        whose manifest matches this model and the database as it is now. Returns the names
        of the indexes loaded. An index the writer has not saved yet stays as it is; the next
        call tries again."""
        state = database_state(session)
        if all(self.states.get(name) == state[name] for name in INDEXES):
            return []
        loaded = []
        with self._write_lock:
            self.store.refresh()
            for name in INDEXES:
                if self.states.get(name) == state[name]:
                    continue
                try:
                    if self._stale(name, state[name]) is not None:
                        continue
                    self._by_name[name] = VectorIndex.load(self.index_dir / name)
                except VectorIndexError as exc:  # being replaced by the writer right now
                    log.debug("not loading the %s index yet: %s", name, exc)
                    continue
                self.states[name] = state[name]
                loaded.append(name)
        if loaded:
            log.info("loaded the %s index%s saved by another process", " and ".join(loaded),
                     "es" if len(loaded) > 1 else "")
        return loaded

    def _save(self, state: dict[str, list[int]], names: Sequence[str] = INDEXES) -> None:
        """Write the indexes ``names`` with the database ``state`` they reflect (the caller
        holds the write lock)."""
        for name in names:
            self._by_name[name].save(self.index_dir / name, model_version=self.model_version,
                                     state={name: state[name]})
            self.states[name] = state[name]

    def _all_fragment_vectors(self, session: Session, progress: bool) -> tuple[np.ndarray, np.ndarray]:
        from tqdm import tqdm

        total = session.scalar(select(func.count(Fragment.id))) or 0
        ids, vectors = [], []
        query = select(Fragment.id, Fragment.region_rows).order_by(Fragment.id)
        with tqdm(total=total, desc="encode fragments", unit="fragment", disable=not progress) as bar:
            for batch in session.execute(query.execution_options(yield_per=ENCODE_BATCH)).partitions():
                ids.extend(r.id for r in batch)
                vectors.append(self._pooled_fragments([r.region_rows for r in batch]))
                bar.update(len(batch))
        return self._stack(ids, vectors)

    def _all_phrase_vectors(self, session: Session, progress: bool) -> tuple[np.ndarray, np.ndarray]:
        from tqdm import tqdm

        rows = session.execute(select(Phrase.id, Phrase.text).order_by(Phrase.id)).all()
        vectors = [
            self._pooled_phrases([r.text for r in rows[start:start + ENCODE_BATCH]])
            for start in tqdm(range(0, len(rows), ENCODE_BATCH), desc="encode phrases",
                              unit="batch", disable=not progress)
        ]
        return self._stack([r.id for r in rows], vectors)

    def _stack(self, ids: list[int], vectors: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        return (np.asarray(ids, dtype=np.int64),
                np.concatenate(vectors) if vectors else np.zeros((0, self.encoder.dim), np.float32))

    def _pooled_fragments(self, region_rows: Sequence[Sequence[int]]) -> np.ndarray:
        from models.encoder import pooled_numpy

        return pooled_numpy(*self.encoder.stored(self.store, region_rows))  # (n, d)

    def _pooled_phrases(self, texts: Sequence[str]) -> np.ndarray:
        from models.encoder import pooled_numpy

        return pooled_numpy(*self.encoder.texts(texts))  # (n, d)
