"""The change log's horizon: the position through which its rows were pruned.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30

One row (id 1). ``pruned_through`` starts at 0 and only rises: rows of ``index_changes``
with an id at or below it were deleted (app.services.changes.prune), so an index whose
position is below it cannot replay the changes it missed and is rebuilt instead.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    horizon = op.create_table(
        "index_log_horizon",
        sa.Column("id", sa.SmallInteger(), primary_key=True),
        sa.Column("pruned_through", sa.BigInteger(), nullable=False),
    )
    op.bulk_insert(horizon, [{"id": 1, "pruned_through": 0}])


def downgrade() -> None:
    op.drop_table("index_log_horizon")
