"""Database engines, sessions and migrations.

The database URL comes from, in order: an explicit argument (``--database-url``), the
``ARTALIGN_DATABASE_URL`` environment variable, then ``sqlite:///var/artalign.db`` — the
embedded default, so the service runs with nothing installed beside it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, inspect
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)

DEFAULT_DATABASE_URL = "sqlite:///var/artalign.db"
MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"
DEFAULT_CONNECT_TIMEOUT = 5  # seconds to reach PostgreSQL before a connection attempt fails


def database_url(explicit: str | None = None) -> str:
    """The URL to use: ``explicit``, else ``$ARTALIGN_DATABASE_URL``, else the SQLite default."""
    return check_database_url(explicit or os.environ.get("ARTALIGN_DATABASE_URL") or DEFAULT_DATABASE_URL)


def check_database_url(url: str) -> str:
    """``url`` if it names a database we support (SQLite, PostgreSQL), with psycopg as driver."""
    if not url.startswith(("sqlite", "postgresql")):
        raise ValueError(
            f"database URL {url!r}: use sqlite:///PATH or postgresql+psycopg://USER@HOST/DB"
        )
    if url.startswith("postgresql://"):
        # psycopg 3 is the driver we ship; plain postgresql:// would ask for psycopg2.
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    return url


def create_db_engine(url: str | None = None, *, connect_timeout: int = DEFAULT_CONNECT_TIMEOUT) -> Engine:
    """An engine for ``url`` (see :func:`database_url`); SQLite enforces foreign keys.

    PostgreSQL connections give up after ``connect_timeout`` seconds (libpq counts whole
    seconds, at least 2), so an unreachable host fails ``/readyz`` instead of hanging it;
    pooled connections are pinged before use, so one the server dropped is replaced.
    """
    if connect_timeout < 1:
        raise ValueError(f"connect_timeout must be at least 1 second, got {connect_timeout}")
    url = database_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        # The service runs inference in worker threads that use the same engine.
        engine = create_engine(url, connect_args={"check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True, connect_args={"connect_timeout": connect_timeout})


def _sqlite_pragmas(dbapi_connection, _record) -> None:  # noqa: ANN001 (DB-API objects)
    cursor = dbapi_connection.cursor()
    # ON DELETE CASCADE only works in SQLite with this on; WAL lets readers run during a write.
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.close()


def session_factory(engine: Engine) -> sessionmaker[Session]:
    # expire_on_commit=False: results returned by services stay readable after their commit.
    return sessionmaker(bind=engine, expire_on_commit=False)


def alembic_config(url: str):  # noqa: ANN201 (alembic imported lazily)
    """An Alembic configuration for our migrations folder, pointed at ``url``."""
    from alembic.config import Config

    config = Config(str(MIGRATIONS_DIR / "alembic.ini"))
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # '%' is ConfigParser interpolation syntax; a password may contain it.
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(url: str | None = None, revision: str = "head") -> str:
    """Migrate the database at ``url`` up to ``revision``; returns the URL used."""
    from alembic import command

    url = database_url(url)
    if url.startswith("sqlite"):
        create_db_engine(url).dispose()  # creates the folder of the database file
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)  # start-up chatter
    command.upgrade(alembic_config(url), revision)
    log.info("database %s is at revision %s", make_url(url).render_as_string(), revision)
    return url


def downgrade(url: str | None, revision: str) -> str:
    """Migrate the database at ``url`` down to ``revision`` (``base`` drops every table)."""
    from alembic import command

    url = database_url(url)
    command.downgrade(alembic_config(url), revision)
    log.info("database %s is at revision %s", make_url(url).render_as_string(), revision)
    return url


def current_revision(engine: Engine) -> str | None:
    """The Alembic revision the database is at, or None when it was never migrated."""
    if not inspect(engine).has_table("alembic_version"):
        return None
    with engine.connect() as connection:
        return connection.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()
