"""The FastAPI application: :func:`create_app` builds it, its lifespan loads the model once.

At startup the lifespan validates the settings' files, connects to the database, loads the
SCAN checkpoint, the region extractor, the feature store and the FAISS indexes (the retrieval
:class:`~app.services.retrieval.Engine`) and keeps them in ``app.state.runtime`` (an
:class:`app.runtime.Runtime`); routes reach them through the dependencies in :mod:`app.api.deps`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from sqlalchemy import Engine as DatabaseEngine

from app.api import errors
from app.api.inference import InferencePool
from app.api.limits import BodyLimitMiddleware
from app.api.metrics import Metrics, MetricsMiddleware
from app.runtime import Runtime
from app.settings import Settings

log = logging.getLogger(__name__)

API_VERSION = "1.0.0"
STATIC_DIR = Path(__file__).resolve().parent / "static"
DESCRIPTION = """\
Align fragments of artwork images with noun phrases of their descriptions, both ways.

* `GET /search?q=` — text → ranked image fragments, with the regions each word attended to.
* `POST /annotate` — an image crop (or a box on a stored artwork) → ranked phrases.
* `/artworks` — a museum back end creates, replaces, reads and removes artworks (writes need
  an `X-API-Key` header).

Errors are `application/problem+json` (RFC 9457).
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    """The service, configured by ``settings`` (default: read from ``ARTALIGN_*`` variables)."""
    settings = settings or Settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime = _start(settings, metrics)
        app.state.runtime = runtime
        log.info(
            "serving %d fragments and %d phrases with model %s",
            runtime.engine.indexes.fragment_count(), runtime.engine.indexes.phrase_count(),
            runtime.engine.model_version[:12],
        )
        stop = threading.Event()
        workers = [threading.Thread(target=_sync_indexes, args=(runtime, stop), name="index-sync",
                                    daemon=True)] if settings.index_sync_seconds > 0 else []
        if settings.index_snapshots:
            workers.append(threading.Thread(target=_snapshot_indexes, args=(runtime, stop),
                                            name="index-snapshot", daemon=True))
        for worker in workers:
            worker.start()
        try:
            yield
        finally:
            stop.set()
            for worker in workers:
                worker.join()  # the snapshot worker saves what is unsaved before it ends
            runtime.pool.shutdown()
            runtime.database.dispose()

    app = FastAPI(
        title="artalign",
        version=API_VERSION,
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,  # app.api.docs serves /docs from installed files, not a CDN
        redoc_url=None,
        responses={
            422: {"description": "invalid request", "content": {errors.PROBLEM_JSON: {}}},
        },
    )
    app.state.settings = settings
    app.state.metrics = metrics
    errors.install(app)
    _include_routes(app)
    # Middleware wraps outside-in in reverse order of adding: metrics sees every request,
    # including those the body limit or CORS refuse.
    app.add_middleware(BodyLimitMiddleware, limit=settings.limits.max_body_bytes)
    app.add_middleware(
        CORSMiddleware,
        allow_origins=settings.cors_origins,
        allow_methods=["GET", "POST", "PUT", "DELETE"],
        allow_headers=["Content-Type", "X-API-Key"],
        expose_headers=["Retry-After"],
    )
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app


def _include_routes(app: FastAPI) -> None:
    from app.api import annotate, artworks, docs, facets, health, search

    for module in (health, search, annotate, artworks, facets):
        app.include_router(module.router)
    docs.install(app)
    if (STATIC_DIR / "index.html").is_file():
        _serve_curator_page(app)


def _serve_curator_page(app: FastAPI) -> None:
    """The curator page: index.html at / and its scripts and styles under /static/."""
    from fastapi.responses import FileResponse
    from fastapi.staticfiles import StaticFiles

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    def curator_page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


class StartupError(RuntimeError):
    """The service cannot start as configured; the message says what to fix."""


def preflight(settings: Settings) -> DatabaseEngine:
    """Check what a start needs before loading anything heavy: the checkpoint files, and a
    reachable, migrated database (returned, connected)."""
    from sqlalchemy.exc import OperationalError

    from app.db.session import create_db_engine, current_revision

    settings.check_files()
    database = create_db_engine(settings.database_url)
    where = database.url.render_as_string()  # hides the password
    try:
        revision = current_revision(database)
    except OperationalError as exc:
        database.dispose()
        raise StartupError(f"the database at {where} cannot be reached: {exc.orig}") from exc
    if revision is None:
        database.dispose()
        raise StartupError(f"the database at {where} has no tables yet: run `artalign db "
                           "upgrade` (with the same ARTALIGN_DATABASE_URL) first")
    return database


def _sync_indexes(runtime: Runtime, stop: threading.Event) -> None:
    """Every ``index_sync_seconds``, apply what other processes committed to the change log
    (Indexes.catch_up), so replicas of the service stay fresh without a restart."""
    while not stop.wait(runtime.settings.index_sync_seconds):
        try:
            with runtime.sessions() as session:
                runtime.engine.indexes.catch_up(session)
        except Exception:  # the database may be down for a while: /readyz says so; try again
            log.warning("index sync failed; retrying in %.1f s", runtime.settings.index_sync_seconds,
                        exc_info=True)


def _snapshot_indexes(runtime: Runtime, stop: threading.Event) -> None:
    """Save a snapshot of the indexes off the request path: once ``index_snapshot_changes``
    changes are unsaved, or the oldest unsaved one is ``index_snapshot_seconds`` old; and a
    last one at shutdown."""
    settings, indexes = runtime.settings, runtime.engine.indexes
    tick = min(1.0, settings.index_snapshot_seconds / 4)
    while not stop.wait(tick):
        count, age = indexes.unsaved()
        if count >= settings.index_snapshot_changes or (count and age >= settings.index_snapshot_seconds):
            try:
                if indexes.save_snapshot():
                    _prune_log(runtime)
            except Exception:  # a full disk, say: the log still holds every change; try again
                log.warning("saving an index snapshot or pruning the log failed; retrying in %.0f s",
                            settings.index_snapshot_seconds, exc_info=True)
                stop.wait(settings.index_snapshot_seconds)
    try:
        indexes.save_snapshot()
    except Exception:
        log.warning("the index snapshot at shutdown failed; the next start replays the log "
                    "from the last one", exc_info=True)


def _prune_log(runtime: Runtime) -> None:
    """Delete the log's changes more than ``index_log_keep`` behind the newest snapshot: a
    start replays the log from a snapshot, so only an index further behind needs them, and
    it rebuilds instead (Indexes.catch_up)."""
    from app.services import changes

    keep = runtime.settings.index_log_keep
    before = runtime.engine.indexes.saved_position - keep
    if not keep or before <= 0:
        return
    with runtime.sessions() as session:
        if before <= changes.pruned_through(session):
            return
        started = time.perf_counter()
        deleted = changes.prune(session, before)
    log.info("pruned the index change log through position %d (%d rows deleted in %.2f s; "
             "the newest snapshot is at %d)", before, deleted, time.perf_counter() - started,
             before + keep)


def _raise_file_limit() -> None:
    """Lift the soft open-file limit to the hard one, as servers do: the feature store keeps
    shards memory-mapped (one descriptor per array) and sizes its cache from this limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            log.info("open-file limit raised from %d to %d", soft, hard)
        except (ValueError, OSError) as exc:
            log.warning("open-file limit stays at %d (%s)", soft, exc)


def _start(settings: Settings, metrics: Metrics) -> Runtime:
    """Load what every request shares; any problem stops the service here, with its cause."""
    from app.db.session import session_factory
    from app.services.retrieval import Engine

    database = preflight(settings)
    _raise_file_limit()
    engine = Engine.load(
        database=database,
        scan_checkpoint=settings.scan_checkpoint,
        detector_checkpoint=settings.detector_checkpoint,
        data_dir=settings.data_dir,
        device=settings.device,
        memory_budget=int(settings.retrieval.memory_budget),
        attribute_words=settings.retrieval.attribute_words,
        index_dir=settings.index_dir,
        snapshots=settings.index_snapshots,
    )
    metrics.track_index("fragments", engine.indexes.fragment_count)
    metrics.track_index("phrases", engine.indexes.phrase_count)
    pool = InferencePool(settings.limits.max_inflight, settings.limits.inference_threads,
                         settings.limits.torch_threads)
    metrics.inflight.set_function(lambda: pool.inflight)
    return Runtime(
        settings=settings,
        database=database,
        sessions=session_factory(database),
        engine=engine,
        pool=pool,
        metrics=metrics,
        key_hashes=settings.api_key_hashes(),
        write_lock=threading.Lock(),
    )
