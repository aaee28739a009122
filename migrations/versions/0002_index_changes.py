"""The index change log: one row per committed change to fragments or phrases.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30

Each ingest, replace, delete or accepted annotation appends a row (the fragment and phrase
ids it added and removed) in its own transaction; the row's id is its position in the log.
The indexes record the position they reflect and replay the rows past it (app.services.changes).
An index saved before this log existed has no position: it is rebuilt once.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "index_changes",
        sa.Column("id", ID, primary_key=True),
        *(sa.Column(name, sa.JSON(), nullable=False)
          for name in ("added_fragments", "removed_fragments", "added_phrases", "removed_phrases")),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sqlite_autoincrement=True,
    )


def downgrade() -> None:
    op.drop_table("index_changes")
