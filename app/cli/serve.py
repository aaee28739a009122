"""`artalign serve` (a real deployment) and `artalign demo` (everything on embedded defaults)."""

from __future__ import annotations

import argparse
import logging
import secrets
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from app.settings import Settings

log = logging.getLogger(__name__)

DEMO_DIR = Path("var/demo")
DEMO_MODEL_DIR = Path("demo")


def register(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser(
        "serve",
        help="serve the HTTP API (settings from ARTALIGN_* environment variables)",
        description=(
            "Serve the HTTP API with uvicorn. Settings come from ARTALIGN_* environment "
            "variables, e.g. ARTALIGN_DATABASE_URL=postgresql+psycopg://artalign@db/artalign, "
            "ARTALIGN_SCAN_CHECKPOINT, ARTALIGN_DETECTOR_CHECKPOINT, ARTALIGN_DATA_DIR, "
            "ARTALIGN_API_KEYS='[\"...\"]', ARTALIGN_LIMITS__MAX_INFLIGHT, "
            "ARTALIGN_RETRIEVAL__MEMORY_BUDGET=4GiB (the index kind follows it). The database must "
            "already be migrated (`artalign db upgrade`)."
        ),
    )
    _add_listen_options(serve)
    serve.set_defaults(handler=run_serve)

    demo = subparsers.add_parser(
        "demo",
        help="build a small demo collection and serve it on http://127.0.0.1:8000",
        description=(
            "The whole system on embedded defaults, nothing else to install: synthesises a "
            "small collection into var/demo (once), migrates a SQLite database there, ingests "
            "the collection with the committed demo model (demo/detector.pt, demo/scan.pt), "
            "builds the indexes and serves them. Run it again and it reuses what is there."
        ),
    )
    _add_listen_options(demo)
    demo.add_argument("--dir", type=Path, default=DEMO_DIR,
                      help="where the demo collection, database and indexes live (default %(default)s)")
    demo.add_argument("--n", type=int, default=200,
                      help="artworks in the synthetic demo collection (default %(default)s)")
    demo.add_argument("--seed", type=int, default=7, help="synthesis seed (default %(default)s)")
    demo.add_argument("--models", type=Path, default=DEMO_MODEL_DIR,
                      help="folder with detector.pt and scan.pt (default %(default)s)")
    demo.add_argument("--prepare-only", action="store_true",
                      help="set everything up, then exit instead of serving")
    demo.set_defaults(handler=run_demo)


def _add_listen_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="port (default %(default)s)")
    parser.add_argument("--log-level", default="info",
                        choices=["critical", "error", "warning", "info", "debug"],
                        help="uvicorn's log level (default %(default)s)")


def run_serve(args: argparse.Namespace) -> int:
    from app.cli import UserError
    from app.main import StartupError, preflight
    from app.settings import Settings

    settings = Settings()
    try:
        preflight(settings).dispose()  # one clear line now, rather than a traceback from uvicorn
    except StartupError as exc:
        raise UserError(str(exc)) from exc
    _serve(settings, args)
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from app.settings import Settings

    root: Path = args.dir
    detector, scan = args.models / "detector.pt", args.models / "scan.pt"
    for path in (detector, scan):
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: the demo model is missing (it is committed in the repository's demo/ "
                "folder; or pass --models DIR with detector.pt and scan.pt)"
            )
    collection = root / "collection"
    database_url = f"sqlite:///{root / 'artalign.db'}"
    prepare_demo(collection=collection, database_url=database_url, data_dir=root,
                 detector=detector, scan=scan, n=args.n, seed=args.seed)
    if args.prepare_only:
        return 0
    api_key = secrets.token_urlsafe(18)
    settings = Settings(
        database_url=database_url, data_dir=root, scan_checkpoint=scan,
        detector_checkpoint=detector, api_keys=[api_key],
    )
    base = f"http://{args.host}:{args.port}"
    print(
        f"\nartalign demo: {args.n} synthetic artworks\n"
        f"  curator page   {base}/\n"
        f"  search         {base}/search?q=two+gold+birds\n"
        f"  API docs       {base}/docs\n"
        f"  readiness      {base}/readyz\n"
        f"  write API key  {api_key}   (send as X-API-Key; new on every start)\n",
        flush=True,
    )
    _serve(settings, args)
    return 0


def prepare_demo(*, collection: Path, database_url: str, data_dir: Path, detector: Path,
                 scan: Path, n: int, seed: int, device: str = "auto") -> None:
    """Synthesise the collection (once), migrate, ingest what is new, build the indexes.

    Every step skips work already done, so a second run (or one after an interruption)
    only does what is missing.
    """
    from app.db.session import create_db_engine, session_factory, upgrade
    from app.services.collection_ingest import ingest_collection
    from app.services.retrieval import Engine
    from collection.layout import Collection
    from index.featurestore import FeatureStore
    from training.extract import extract_collection

    if not (collection / "collection.json").is_file():
        from collection.synth import synthesise

        log.info("synthesising %d demo artworks into %s", n, collection)
        synthesise(collection, n=n, seed=seed)
    upgrade(database_url)
    database = create_db_engine(database_url)
    try:
        engine = Engine.load(database=database, scan_checkpoint=scan, detector_checkpoint=detector,
                             data_dir=data_dir, device=device)
        demo = Collection.load(collection)
        # Regions of every image first, in batches (one detector pass per image, annotation
        # boxes included), into the collection's own feature store, which ingestion reuses.
        extract_collection(demo, engine.extractor,
                           FeatureStore(collection / "features", extractor=engine.extractor.version))
        with session_factory(database)() as session:
            # The extractor alone (not the engine): one index build at the end is cheaper
            # than updating the indexes after every artwork.
            counts = ingest_collection(session, extractor=engine.extractor,
                                       store=engine.store, collection=demo)
            if counts["created"] or counts["replaced"]:
                engine.indexes.rebuild(session, progress=True)
        log.info("demo ready: %d fragments, %d phrases", engine.indexes.fragment_count(),
                 engine.indexes.phrase_count())
    finally:
        database.dispose()


def _serve(settings: Settings, args: argparse.Namespace) -> None:
    import uvicorn

    from app.main import create_app

    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level=args.log_level)
