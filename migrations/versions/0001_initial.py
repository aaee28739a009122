"""Initial schema: artworks, captions, phrases, regions, fragments, annotations, index builds, API keys.

Revision ID: 0001
Revises:
Create Date: 2026-11-28

Runs unchanged on PostgreSQL and SQLite: ids are BIGINT on PostgreSQL and INTEGER PRIMARY
KEY AUTOINCREMENT on SQLite (the only form SQLite autoincrements, and it never reuses the id
of a deleted row, which the FAISS indexes rely on).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
NO_REUSE = {"sqlite_autoincrement": True}


def _id() -> sa.Column:
    return sa.Column("id", ID, primary_key=True)


def _timestamp(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _artwork_fk() -> sa.Column:
    return sa.Column(
        "artwork_id", ID, sa.ForeignKey("artworks.id", ondelete="CASCADE"), nullable=False,
        index=True,
    )


def _box() -> list[sa.Column]:
    return [sa.Column(name, sa.Float(), nullable=False) for name in ("x1", "y1", "x2", "y2")]


def upgrade() -> None:
    op.create_table(
        "artworks",
        _id(),
        sa.Column("external_id", sa.String(200), nullable=False, unique=True),
        sa.Column("title", sa.Text(), nullable=False),
        sa.Column("metadata", sa.JSON(), nullable=False),
        sa.Column("image_location", sa.Text(), nullable=False),
        sa.Column("image_sha256", sa.String(64), nullable=False, index=True),
        sa.Column("content_sha256", sa.String(64), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("split", sa.String(16), nullable=True),
        _timestamp("created_at"),
        _timestamp("updated_at"),
        **NO_REUSE,
    )
    op.create_table(
        "captions",
        _id(),
        _artwork_fk(),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        **NO_REUSE,
    )
    op.create_table(
        "phrases",
        _id(),
        sa.Column("text", sa.String(500), nullable=False, unique=True),
        _timestamp("created_at"),
        **NO_REUSE,
    )
    op.create_table(
        "artwork_phrases",
        sa.Column(
            "artwork_id", ID, sa.ForeignKey("artworks.id", ondelete="CASCADE"), primary_key=True
        ),
        sa.Column(
            "phrase_id", ID, sa.ForeignKey("phrases.id", ondelete="CASCADE"), primary_key=True,
            index=True,
        ),
    )
    op.create_table(
        "regions",
        _id(),
        _artwork_fk(),
        sa.Column("store_row", sa.BigInteger(), nullable=False),
        *_box(),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("kind", sa.SmallInteger(), nullable=False),
        **NO_REUSE,
    )
    op.create_table(
        "fragments",
        _id(),
        _artwork_fk(),
        *_box(),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("region_rows", sa.JSON(), nullable=False),
        **NO_REUSE,
    )
    op.create_table(
        "annotations",
        _id(),
        _artwork_fk(),
        sa.Column(
            "phrase_id", ID, sa.ForeignKey("phrases.id", ondelete="RESTRICT"), nullable=False,
            index=True,
        ),
        *_box(),
        sa.Column("source", sa.String(16), nullable=False),
        _timestamp("created_at"),
        **NO_REUSE,
    )
    op.create_table(
        "index_builds",
        _id(),
        sa.Column("model_version", sa.String(64), nullable=False),
        sa.Column("fragment_count", sa.BigInteger(), nullable=False),
        sa.Column("phrase_count", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        _timestamp("started_at"),
        _timestamp("finished_at", nullable=True),
        **NO_REUSE,
    )
    op.create_table(
        "api_keys",
        _id(),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("key_sha256", sa.String(64), nullable=False, unique=True),
        _timestamp("created_at"),
        sa.Column("revoked", sa.Boolean(), nullable=False),
        _timestamp("revoked_at", nullable=True),
        **NO_REUSE,
    )


def downgrade() -> None:
    # Children before parents, so foreign keys never point at a dropped table.
    for table in ("api_keys", "index_builds", "annotations", "fragments", "regions",
                  "artwork_phrases", "phrases", "captions", "artworks"):
        op.drop_table(table)
