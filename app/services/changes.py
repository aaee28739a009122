"""The index change log: what every committed change did to fragments and phrases, in order.

A write (ingest, replace, delete, an accepted annotation) fills an :class:`IndexChange` while
it writes its rows, and :func:`record_change` appends it to ``index_changes`` as the last
statement of the same transaction: the change is in the log exactly when its rows are in
the database. A row's id is its position in the log. The indexes remember the position they
reflect and apply the rows past it (:meth:`app.services.indexes.Indexes.catch_up`); that one
path serves the writer after its own commit, a replica every sync, and a start after a
snapshot. Reading "where the database is" is ``max(id)`` of this table: an index lookup,
whatever the size of the collection.

Commit order is id order. A reader that has applied position ``p`` reads ``id > p``; were a
row with a smaller id to commit after a larger one, the reader would skip it for ever. So
on PostgreSQL a writer takes a transaction-level advisory lock just before inserting its row
(ids are drawn under it, and it is released only after the commit is visible); SQLite
already runs one write transaction at a time.

The log is pruned behind the snapshots (:func:`prune`, called by the service after each
snapshot, keeping ``index_log_keep`` changes): ``index_log_horizon`` records the position
through which rows were deleted. An index whose position is below that horizon cannot replay
what it missed; :meth:`~app.services.indexes.Indexes.catch_up` sees it and rebuilds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlalchemy import delete, func, select, text, update
from sqlalchemy.orm import Session

from app.db.models import IndexChangeRow, IndexLogHorizon

# pg_advisory_xact_lock key of the log's writers (any constant: it names this lock only).
LOG_LOCK_KEY = 0x61727461  # "arta"
PRUNE_CHUNK = 10_000  # log rows deleted per transaction by prune()


@dataclass
class IndexChange:
    """Database ids whose vectors the indexes must add or drop after a committed change."""

    added_fragments: list[int] = field(default_factory=list)
    removed_fragments: list[int] = field(default_factory=list)
    added_phrases: list[int] = field(default_factory=list)
    removed_phrases: list[int] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.added_fragments or self.removed_fragments or self.added_phrases
                    or self.removed_phrases)


@dataclass(frozen=True)
class LogEntry:
    """One row of the log: its position, when it was committed, and the change."""

    position: int
    created_at: datetime
    change: IndexChange


@dataclass(frozen=True)
class Lag:
    """How far an index is behind the log."""

    applied: int  # the log position the index reflects
    latest: int  # the newest position in the database
    changes: int  # committed changes not applied yet
    seconds: float  # age of the oldest of them; 0 when caught up


@dataclass(frozen=True)
class Coalesced:
    """Log entries folded into what an index must do: drop ``removed`` (every id the entries
    name), then add those of ``added`` whose rows still exist."""

    removed_fragments: list[int]
    added_fragments: list[int]
    removed_phrases: list[int]
    added_phrases: list[int]


def record_change(session: Session, change: IndexChange) -> None:
    """Append ``change`` to the log inside the caller's transaction: call it last, just
    before the commit (on PostgreSQL the log's lock is held from here until the commit).
    An empty change writes nothing."""
    if not change:
        return
    postgres = _on_postgres(session)
    if postgres:
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": LOG_LOCK_KEY})
    session.add(IndexChangeRow(
        added_fragments=list(change.added_fragments), removed_fragments=list(change.removed_fragments),
        added_phrases=list(change.added_phrases), removed_phrases=list(change.removed_phrases),
        # the server's clock on PostgreSQL, so writers on hosts whose clocks disagree still
        # stamp the log in one time, the one lag() measures against
        created_at=func.clock_timestamp() if postgres else datetime.now(UTC),
    ))
    session.flush()


def _on_postgres(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def latest_position(session: Session) -> int:
    """The position of the newest committed change (0 for an empty log)."""
    return int(session.scalar(select(func.max(IndexChangeRow.id))) or 0)


def pruned_through(session: Session) -> int:
    """The position through which the log's rows were deleted (0: none ever were)."""
    return int(session.scalar(select(IndexLogHorizon.pruned_through)
                              .where(IndexLogHorizon.id == 1)) or 0)


def pruned_past(session: Session, position: int, entries: Sequence[LogEntry]) -> int:
    """The horizon when rows past ``position`` were pruned, else 0; ``entries`` are the rows
    just read past it. Ids have gaps (rolled-back transactions), so a gap proves nothing: the
    horizon is read (after the rows) only when the first row is not ``position + 1``."""
    if entries and entries[0].position == position + 1:
        return 0
    horizon = pruned_through(session)
    return horizon if horizon > position else 0


def prune(session: Session, before: int, chunk: int = PRUNE_CHUNK) -> int:
    """Delete the log's rows with an id at or below ``before``, ``chunk`` rows per committed
    transaction, after raising the horizon to ``before`` (it never goes down); returns how
    many rows were deleted. In chunks, a first prune behind a bulk import of millions of
    changes holds no lock for long (on SQLite, the one write lock every upload waits for).
    The horizon is committed first, so a reader that finds rows gone past its position also
    finds the horizon, and rebuilds; rows that a crash leaves behind go with the next prune.
    An index still below ``before`` rebuilds at its next catch-up."""
    session.execute(update(IndexLogHorizon).where(IndexLogHorizon.id == 1,
                                                  IndexLogHorizon.pruned_through < before)
                    .values(pruned_through=before))
    session.commit()
    deleted = 0
    while True:
        oldest = (select(IndexChangeRow.id).where(IndexChangeRow.id <= before)
                  .order_by(IndexChangeRow.id).limit(chunk))
        count = int(session.execute(delete(IndexChangeRow)
                                    .where(IndexChangeRow.id.in_(oldest.scalar_subquery())))
                    .rowcount or 0)
        session.commit()
        deleted += count
        if count < chunk:
            return deleted


def read_changes(session: Session, after: int, limit: int) -> list[LogEntry]:
    """The first ``limit`` entries past position ``after``, in log order."""
    rows = session.scalars(
        select(IndexChangeRow).where(IndexChangeRow.id > after).order_by(IndexChangeRow.id).limit(limit)
    ).all()
    return [LogEntry(row.id, as_utc(row.created_at),
                     IndexChange(row.added_fragments, row.removed_fragments, row.added_phrases,
                                 row.removed_phrases))
            for row in rows]


def stamp_of(session: Session, position: int) -> str | None:
    """When the change at ``position`` was committed (ISO 8601), None when the log has no such
    row: a saved index names its position and this stamp, so a snapshot taken against another
    database (a fresh one whose log reached the same number) is not mistaken for ours."""
    created = session.scalar(select(IndexChangeRow.created_at).where(IndexChangeRow.id == position))
    return as_utc(created).isoformat() if created is not None else None


def lag(session: Session, applied: int) -> Lag:
    """How far position ``applied`` is behind the log: two index lookups when caught up."""
    latest = latest_position(session)
    if latest <= applied:
        return Lag(applied, latest, 0, 0.0)
    behind = session.scalar(select(func.count()).select_from(IndexChangeRow)
                            .where(IndexChangeRow.id > applied))
    oldest = (select(IndexChangeRow.created_at).where(IndexChangeRow.id > applied)
              .order_by(IndexChangeRow.id).limit(1))
    if _on_postgres(session):  # the clock that stamped the row: no skew between hosts
        seconds = session.scalar(select(func.extract(
            "epoch", func.clock_timestamp() - oldest.scalar_subquery())))
    else:  # SQLite is embedded: its writers and readers share this host's clock
        created = session.scalar(oldest)
        seconds = (datetime.now(UTC) - as_utc(created)).total_seconds() if created is not None else None
    return Lag(applied, latest, int(behind or 0), max(0.0, float(seconds or 0.0)))


def coalesce(entries: Sequence[LogEntry]) -> Coalesced:
    """Fold ``entries`` into one removal and one addition. Ids are never reused, so dropping
    every id the entries name and then adding back the added ones that still exist (the
    caller checks) gives the same index whatever was applied before: replays are idempotent,
    and an artwork added then deleted within the entries leaves no trace."""
    def ids(name: str) -> list[int]:
        return sorted({i for entry in entries for i in getattr(entry.change, name)})

    added_fragments, added_phrases = ids("added_fragments"), ids("added_phrases")
    return Coalesced(
        removed_fragments=sorted({*added_fragments, *ids("removed_fragments")}),
        added_fragments=added_fragments,
        removed_phrases=sorted({*added_phrases, *ids("removed_phrases")}),
        added_phrases=added_phrases,
    )


def as_utc(moment: datetime) -> datetime:
    """SQLite hands back naive datetimes; the log writes UTC."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
