"""`artalign index build`: encode every fragment and phrase and write the FAISS indexes."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    index = subparsers.add_parser(
        "index", help="build the FAISS indexes of fragments and phrases",
        description="The search indexes: one of fragment vectors, one of phrase vectors, "
                    "computed with the SCAN model from the feature store and the database.",
    )
    commands = index.add_subparsers(dest="index_command", metavar="ACTION", required=True)
    build = commands.add_parser(
        "build", help="build the indexes (only those that are stale, unless --force)",
        description="Bring the indexes under DATA_DIR/index (or $ARTALIGN_INDEX_DIR) up to "
                    "date and save a snapshot: an index whose snapshot names this SCAN "
                    "checkpoint is loaded and the database's change log past the snapshot is "
                    "replayed; any other is rebuilt beside it and swapped in atomically. Exact "
                    "search below 50,000 vectors, above an IVF index of the most precise "
                    "codes that fit $ARTALIGN_RETRIEVAL__MEMORY_BUDGET (default 4 GiB).",
    )
    build.add_argument("--database-url", help="database URL (default $ARTALIGN_DATABASE_URL, "
                                              "else sqlite:///var/artalign.db)")
    build.add_argument("--data-dir", type=Path,
                       help="holds features/ and index/ (default $ARTALIGN_DATA_DIR or var)")
    build.add_argument("--scan-checkpoint", type=Path,
                       help="the SCAN model (default $ARTALIGN_SCAN_CHECKPOINT)")
    build.add_argument("--force", action="store_true", help="rebuild even when up to date")
    build.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                       help="where the model runs (default %(default)s)")
    build.set_defaults(handler=run_build)


def run_build(args: argparse.Namespace) -> int:
    from app.db.session import create_db_engine, database_url, session_factory
    from app.services.indexes import Indexes
    from app.settings import Settings
    from index.featurestore import FeatureStore
    from models.checkpoint import resolve_device
    from models.encoder import Encoder
    from models.scan import load_scan

    settings = Settings()
    data_dir = args.data_dir or settings.data_dir
    device = resolve_device(args.device)
    model, vocab, checkpoint = load_scan(args.scan_checkpoint or settings.scan_checkpoint,
                                         device=device)
    database = create_db_engine(database_url(args.database_url or settings.database_url))
    indexes = Indexes(encoder=Encoder(model, vocab), model_version=checkpoint.sha256,
                      store=FeatureStore(data_dir / "features"),
                      index_dir=settings.index_dir or data_dir / "index",
                      memory_budget=int(settings.retrieval.memory_budget))
    try:
        with session_factory(database)() as session:
            if args.force:
                indexes.rebuild(session, progress=True)
                outcome = {"fragments": "rebuilt", "phrases": "rebuilt"}
            else:
                outcome = indexes.start(session)
        indexes.save_snapshot()
    finally:
        database.dispose()
    print(f"fragments: {indexes.fragment_count()} ({outcome['fragments']}), "
          f"phrases: {indexes.phrase_count()} ({outcome['phrases']}); model {indexes.model_version[:12]}")
    return 0
