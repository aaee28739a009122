"""`artalign serve` (a real deployment) and `artalign demo` (everything on embedded defaults)."""

from __future__ import annotations

import argparse
import json
import logging
import secrets
import shutil
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote, quote_plus

if TYPE_CHECKING:
    from collections.abc import Callable

    from app.settings import Settings

log = logging.getLogger(__name__)

DEMO_DIR = Path("var/demo")
REAL_DEMO = Path("demo/real")  # the committed real collection: metadata.csv, images/, models
# --collection -> (the default model folder, an example query for the printed URLs)
DEMO_COLLECTIONS = {"real": (REAL_DEMO, "canopic jar"), "synthetic": (Path("demo"), "two gold birds")}


def register(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser(
        "serve",
        help="serve the HTTP API (settings from ARTALIGN_* environment variables)",
        description=(
            "Serve the HTTP API with uvicorn. Settings come from ARTALIGN_* environment "
            "variables, e.g. ARTALIGN_DATABASE_URL=postgresql+psycopg://artalign@db/artalign, "
            "ARTALIGN_SCAN_CHECKPOINT, ARTALIGN_DETECTOR_CHECKPOINT, ARTALIGN_DATA_DIR, "
            "ARTALIGN_API_KEYS='[\"...\"]', ARTALIGN_LIMITS__MAX_INFLIGHT, "
            "ARTALIGN_RETRIEVAL__MEMORY_BUDGET=4GiB (the index kind follows it), "
            "ARTALIGN_INDEX_SNAPSHOTS=false (a replica sharing the writer's data folder). The "
            "database must already be migrated (`artalign db upgrade`)."
        ),
    )
    _add_listen_options(serve)
    serve.set_defaults(handler=run_serve)

    demo = subparsers.add_parser(
        "demo",
        help="build a demo collection (real museum objects by default) and serve it on "
             "http://127.0.0.1:8000",
        description=(
            "The whole system on embedded defaults, nothing else to install. --collection real "
            "(the default) imports a few hundred CC0 photographs of Egyptian objects with their museum "
            "catalogue lines (demo/real/) and serves them with the committed real-photo models "
            "(demo/real/detector.pt, demo/real/scan.pt): search 'canopic jar' or 'seated "
            "statue'. --collection synthetic renders a small annotated collection of "
            "artwork-like drawings instead, with the synthetic demo models (demo/detector.pt, "
            "demo/scan.pt). Either way the collection, a SQLite database and the indexes go to "
            "--dir (once); run it again and it reuses what is there."
        ),
    )
    _add_listen_options(demo)
    demo.add_argument("--collection", choices=sorted(DEMO_COLLECTIONS), default="real",
                      help="real: Egyptian museum photographs; synthetic: generated drawings "
                           "with boxed motifs (default %(default)s)")
    demo.add_argument("--dir", type=Path, default=None,
                      help="where the collection, database and indexes live (default "
                           "var/demo/COLLECTION)")
    demo.add_argument("--models", type=Path, default=None,
                      help="folder with detector.pt and a SCAN scan.pt trained on its features "
                           "(default demo/real for real, demo for synthetic)")
    demo.add_argument("--n", type=int, default=200,
                      help="synthetic only: number of artworks (default %(default)s)")
    demo.add_argument("--seed", type=int, default=7,
                      help="synthetic only: synthesis seed (default %(default)s)")
    demo.add_argument("--threads", type=int, default=1,
                      help="CPU threads for torch (default 1: measured on 2 shared cores, one "
                           "thread extracted regions 5x faster than two; 0: one per core)")
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

    models, query = DEMO_COLLECTIONS[args.collection]
    models = args.models or models
    root: Path = args.dir or DEMO_DIR / args.collection
    detector, scan = models / "detector.pt", models / "scan.pt"
    for path in (detector, scan):
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: the demo model is missing (it is committed in the repository's "
                f"{models}/ folder; or pass --models DIR with detector.pt and scan.pt)"
            )
    if args.collection == "real":
        create, what = import_real_demo, "real Egyptian artworks (CC0)"
    else:
        from collection.synth import synthesise

        create, what = partial(synthesise, n=args.n, seed=args.seed), "synthetic artworks"
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    restart_if_detector_changed(root, detector)
    database_url = f"sqlite:///{root / 'artalign.db'}"
    count = prepare_demo(collection=root / "collection", create=create, database_url=database_url,
                         data_dir=root, detector=detector, scan=scan)
    if args.prepare_only:
        return 0
    api_key = secrets.token_urlsafe(18)
    settings = Settings(
        database_url=database_url, data_dir=root, scan_checkpoint=scan,
        detector_checkpoint=detector, api_keys=[api_key],
        # The real demo's detector learnt its words on byzart-dev's icons (saint, aura,
        # christ): on Egyptian objects they would name the wrong things.
        retrieval={"attribute_words": args.collection != "real"},
    )
    base = f"http://{args.host}:{args.port}"
    print(
        f"\nartalign demo: {count} {what}\n"
        f"  curator page   {base}/\n"
        f"  search page    {base}/#/search?q={quote(query)}\n"
        f"  search API     {base}/search?q={quote_plus(query)}\n"
        f"  API docs       {base}/docs\n"
        f"  readiness      {base}/readyz\n"
        f"  write API key  {api_key}   (send as X-API-Key; new on every start)\n",
        flush=True,
    )
    _serve(settings, args)
    return 0


def restart_if_detector_changed(root: Path, detector: Path) -> None:
    """A demo folder built with another detector holds region features the new one cannot
    read; everything in it derives from committed files, so it starts afresh."""
    from models.checkpoint import file_sha256

    manifests = [root / "features" / "manifest.json", root / "collection" / "features" / "manifest.json"]
    built_with = {json.loads(m.read_text(encoding="utf-8")).get("extractor") for m in manifests if m.is_file()}
    others = built_with - {None, file_sha256(detector)}
    if others:
        log.warning("%s was built with another detector (%s…) than %s: starting it afresh",
                    root, others.pop()[:12], detector)
        shutil.rmtree(root)


def import_real_demo(out: Path, source: Path = REAL_DEMO) -> None:
    """Import the committed real collection (SOURCE/metadata.csv, SOURCE/images/) into
    ``out`` as README's `artalign import csv` example does."""
    from collection.importers import CsvMapping, import_csv

    log.info("importing the real demo collection %s into %s", source, out)
    import_csv(out, csv_path=source / "metadata.csv", images=source / "images",
               mapping=CsvMapping(id_column="ID", caption_columns=("Title", "ObjectName", "Medium", "Period"),
                                  image_pattern="{id}.jpg"))


def prepare_demo(*, collection: Path, create: Callable[[Path], object], database_url: str,
                 data_dir: Path, detector: Path, scan: Path, device: str = "auto") -> int:
    """Create the collection with ``create(collection)`` (once), migrate, ingest what is
    new, build the indexes. Returns the number of artworks.

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
        create(collection)
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
        engine.indexes.save_snapshot()
        log.info("demo ready: %d fragments, %d phrases", engine.indexes.fragment_count(),
                 engine.indexes.phrase_count())
        return len(demo.artworks)
    finally:
        database.dispose()


def _serve(settings: Settings, args: argparse.Namespace) -> None:
    import uvicorn

    from app.main import create_app

    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level=args.log_level)
