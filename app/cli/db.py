"""`artalign db …` (migrate the database) and `artalign ingest` (load a collection into it)."""

from __future__ import annotations

import argparse
from pathlib import Path

URL_HELP = ("database URL, e.g. sqlite:///var/artalign.db or "
            "postgresql+psycopg://user@host/artalign (default: $ARTALIGN_DATABASE_URL, "
            "else sqlite:///var/artalign.db)")


def register(subparsers: argparse._SubParsersAction) -> None:
    db = subparsers.add_parser(
        "db", help="create or migrate the database schema",
        description="Manage the database schema with its Alembic migrations. The same "
                    "migrations run on PostgreSQL and on the embedded SQLite default.",
    )
    commands = db.add_subparsers(dest="db_command", metavar="ACTION", required=True)
    upgrade = commands.add_parser(
        "upgrade", help="migrate up to the newest schema (creates the tables on a new database)",
        description="Migrate the database up to REVISION (default: the newest). Safe to run "
                    "again: a database already there is left as it is.",
    )
    upgrade.add_argument("--database-url", help=URL_HELP)
    upgrade.add_argument("--revision", default="head", help="target revision (default %(default)s)")
    upgrade.set_defaults(handler=run_upgrade)
    downgrade = commands.add_parser(
        "downgrade", help="migrate down to an older schema ('base' drops every table: data is lost)",
    )
    downgrade.add_argument("revision", help="target revision, e.g. 0001, or base")
    downgrade.add_argument("--database-url", help=URL_HELP)
    downgrade.set_defaults(handler=run_downgrade)
    current = commands.add_parser("current", help="print the revision the database is at")
    current.add_argument("--database-url", help=URL_HELP)
    current.set_defaults(handler=run_current)

    ingest = subparsers.add_parser(
        "ingest", help="load a collection folder into the database and the feature store",
        description="Load every artwork of a collection (made by `artalign synth` or an "
                    "import) into the database: images are read where the collection keeps "
                    "them, regions come from the collection's own feature store when it has "
                    "them, else from the region extractor. Artworks already loaded with the "
                    "same content are left unchanged, changed ones are replaced. With a SCAN "
                    "checkpoint the indexes are brought up to date afterwards.",
    )
    ingest.add_argument("--collection", type=Path, required=True, help="the collection folder")
    ingest.add_argument("--database-url", help=URL_HELP)
    ingest.add_argument("--data-dir", type=Path,
                        help="where the feature store and indexes live (default $ARTALIGN_DATA_DIR or var)")
    ingest.add_argument("--detector-checkpoint", type=Path,
                        help="region extractor (default $ARTALIGN_DETECTOR_CHECKPOINT)")
    ingest.add_argument("--scan-checkpoint", type=Path,
                        help="SCAN model for the indexes (default $ARTALIGN_SCAN_CHECKPOINT)")
    ingest.add_argument("--no-index", action="store_true",
                        help="do not build the indexes now (the service builds them at start)")
    ingest.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="where the models run (default %(default)s)")
    ingest.set_defaults(handler=run_ingest)


def run_upgrade(args: argparse.Namespace) -> int:
    from app.db.session import upgrade

    url = upgrade(args.database_url, args.revision)
    print(f"database {_safe(url)} is at {args.revision}")
    return 0


def run_downgrade(args: argparse.Namespace) -> int:
    from app.db.session import downgrade

    url = downgrade(args.database_url, args.revision)
    print(f"database {_safe(url)} is at {args.revision}")
    return 0


def run_current(args: argparse.Namespace) -> int:
    from app.db.session import create_db_engine, current_revision

    engine = create_db_engine(args.database_url)
    try:
        revision = current_revision(engine)
    finally:
        engine.dispose()
    print(revision or "none (run `artalign db upgrade`)")
    return 0


def run_ingest(args: argparse.Namespace) -> int:
    from app.db.session import database_url
    from app.services.collection_ingest import ingest_collection_into
    from app.settings import Settings

    settings = Settings()
    counts = ingest_collection_into(
        database_url=database_url(args.database_url or settings.database_url),
        collection=args.collection, data_dir=args.data_dir or settings.data_dir,
        detector=args.detector_checkpoint or settings.detector_checkpoint,
        scan=None if args.no_index else (args.scan_checkpoint or settings.scan_checkpoint),
        device=args.device, index_dir=settings.index_dir,
    )
    print(", ".join(f"{n} {status}" for status, n in sorted(counts.items())) or "nothing to ingest")
    return 0


def _safe(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)
