"""Alembic environment: runs migrations online against the configured URL.

The URL comes from ``-x url=...``, else the configuration's ``sqlalchemy.url`` (set by
``app.db.session.upgrade``), else ``ARTALIGN_DATABASE_URL`` / the SQLite default. SQLite
gets batch mode, so ALTER TABLE migrations also run there.
"""

from __future__ import annotations

from alembic import context

from app.db.models import Base
from app.db.session import create_db_engine, database_url

config = context.config
url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option(
    "sqlalchemy.url"
)
engine = create_db_engine(database_url(url or None))

with engine.connect() as connection:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()
engine.dispose()
