"""The database schema: SQLAlchemy 2.0 declarative models.

One artwork has captions, regions (rows of the feature store), fragments (a box plus its
region set, the retrievable unit on the image side) and annotations; phrases are shared
between artworks through a link table. Deleting an artwork cascades to everything it owns;
phrases that no artwork links to any more are removed by the ingest service.

Ids of fragments and phrases are the ids in the FAISS indexes. ``sqlite_autoincrement``
stops SQLite from reusing the id of a deleted row, so an id never names two things: a replay
of the index change log (:class:`IndexChangeRow`) can drop every id it names and add back
those whose rows still exist.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# Named constraints, so that Alembic migrations (and SQLite batch mode) can refer to them.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

FRAGMENT_SOURCES = ("whole", "extracted", "annotation", "crop")
ANNOTATION_SOURCES = ("ground_truth", "curator")
BUILD_STATES = ("building", "ready", "failed")
# BigInteger ids on PostgreSQL; SQLite only autoincrements an INTEGER PRIMARY KEY.
Id = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    return datetime.now(UTC)


class BoxColumns:
    """An xyxy box in original image pixels, as four columns."""

    x1: Mapped[float] = mapped_column(Float)
    y1: Mapped[float] = mapped_column(Float)
    x2: Mapped[float] = mapped_column(Float)
    y2: Mapped[float] = mapped_column(Float)

    @property
    def box(self) -> tuple[float, float, float, float]:
        return (self.x1, self.y1, self.x2, self.y2)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Artwork(Base):
    __tablename__ = "artworks"
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    external_id: Mapped[str] = mapped_column(String(200), unique=True)
    title: Mapped[str] = mapped_column(Text, default="")
    # "metadata" is reserved on declarative classes; the column keeps the plain name.
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, default=dict)
    image_location: Mapped[str] = mapped_column(Text)
    image_sha256: Mapped[str] = mapped_column(String(64), index=True)
    # sha256 over the image hash, title, metadata, captions and annotations: same input, same hash
    content_sha256: Mapped[str] = mapped_column(String(64))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    split: Mapped[str | None] = mapped_column(String(16), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow
    )

    captions: Mapped[list[Caption]] = relationship(
        back_populates="artwork", cascade="all, delete-orphan", order_by="Caption.position"
    )
    regions: Mapped[list[Region]] = relationship(
        back_populates="artwork", cascade="all, delete-orphan", order_by="Region.store_row"
    )
    fragments: Mapped[list[Fragment]] = relationship(
        back_populates="artwork", cascade="all, delete-orphan", order_by="Fragment.id"
    )
    annotations: Mapped[list[Annotation]] = relationship(
        back_populates="artwork", cascade="all, delete-orphan", order_by="Annotation.id"
    )
    phrase_links: Mapped[list[ArtworkPhrase]] = relationship(
        back_populates="artwork", cascade="all, delete-orphan"
    )


class Caption(Base):
    __tablename__ = "captions"
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    artwork_id: Mapped[int] = mapped_column(
        ForeignKey("artworks.id", ondelete="CASCADE"), index=True
    )
    position: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text)

    artwork: Mapped[Artwork] = relationship(back_populates="captions")


class Phrase(Base):
    __tablename__ = "phrases"
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    text: Mapped[str] = mapped_column(String(500), unique=True)  # normalised
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    artwork_links: Mapped[list[ArtworkPhrase]] = relationship(back_populates="phrase")


class ArtworkPhrase(Base):
    """A phrase describes an artwork (from its captions or its annotations)."""

    __tablename__ = "artwork_phrases"

    artwork_id: Mapped[int] = mapped_column(
        ForeignKey("artworks.id", ondelete="CASCADE"), primary_key=True
    )
    phrase_id: Mapped[int] = mapped_column(
        ForeignKey("phrases.id", ondelete="CASCADE"), primary_key=True, index=True
    )

    artwork: Mapped[Artwork] = relationship(back_populates="phrase_links")
    phrase: Mapped[Phrase] = relationship(back_populates="artwork_links")


class Region(BoxColumns, Base):
    """One row of the feature store seen on an artwork: whole image, extracted or annotation box."""

    __tablename__ = "regions"
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    artwork_id: Mapped[int] = mapped_column(
        ForeignKey("artworks.id", ondelete="CASCADE"), index=True
    )
    store_row: Mapped[int] = mapped_column(BigInteger)
    score: Mapped[float] = mapped_column(Float)
    kind: Mapped[int] = mapped_column(SmallInteger)  # 0 whole, 1 extracted, 2 annotation, 3 given

    artwork: Mapped[Artwork] = relationship(back_populates="regions")


class Fragment(BoxColumns, Base):
    """A box on an artwork and its region set (global feature-store rows, the box's own first)."""

    __tablename__ = "fragments"
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    artwork_id: Mapped[int] = mapped_column(
        ForeignKey("artworks.id", ondelete="CASCADE"), index=True
    )
    source: Mapped[str] = mapped_column(String(16))  # FRAGMENT_SOURCES
    region_rows: Mapped[list[int]] = mapped_column(JSON)

    artwork: Mapped[Artwork] = relationship(back_populates="fragments")


class Annotation(BoxColumns, Base):
    """A phrase on a box of an artwork: ground truth, or a suggestion a curator accepted."""

    __tablename__ = "annotations"
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    artwork_id: Mapped[int] = mapped_column(
        ForeignKey("artworks.id", ondelete="CASCADE"), index=True
    )
    phrase_id: Mapped[int] = mapped_column(ForeignKey("phrases.id", ondelete="RESTRICT"), index=True)
    source: Mapped[str] = mapped_column(String(16))  # ANNOTATION_SOURCES
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    artwork: Mapped[Artwork] = relationship(back_populates="annotations")
    phrase: Mapped[Phrase] = relationship()


class IndexBuild(Base):
    """One build of the FAISS indexes: which model, how many rows, and how it went."""

    __tablename__ = "index_builds"
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    model_version: Mapped[str] = mapped_column(String(64))
    fragment_count: Mapped[int] = mapped_column(BigInteger, default=0)
    phrase_count: Mapped[int] = mapped_column(BigInteger, default=0)
    state: Mapped[str] = mapped_column(String(16), default="building")  # BUILD_STATES
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class IndexChangeRow(Base):
    """One committed change to fragments or phrases, written in the same transaction; its id
    is its position in the log (commit order: see app.services.changes.record_change)."""

    __tablename__ = "index_changes"
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    added_fragments: Mapped[list[int]] = mapped_column(JSON)
    removed_fragments: Mapped[list[int]] = mapped_column(JSON)
    added_phrases: Mapped[list[int]] = mapped_column(JSON)
    removed_phrases: Mapped[list[int]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class IndexLogHorizon(Base):
    """The one row (id 1) saying through which position the change log was pruned: rows
    with an id at or below ``pruned_through`` are gone (app.services.changes.prune)."""

    __tablename__ = "index_log_horizon"

    id: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    pruned_through: Mapped[int] = mapped_column(BigInteger, default=0)


class ApiKey(Base):
    """A key that may write; only its sha256 is stored."""

    __tablename__ = "api_keys"
    __table_args__ = (UniqueConstraint("key_sha256"), {"sqlite_autoincrement": True})

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    key_sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
