"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from sqlalchemy import text

from app.api.deps import RuntimeDep
from app.api.schemas import Health, IndexState, Readiness, ReadinessCheck
from app.runtime import Runtime

router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=Health, summary="Liveness: the process answers")
def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Readiness,
    summary="Readiness: model, index and database each checked",
    responses={503: {"model": Readiness, "description": "a part is not ready"}},
)
def readyz(runtime: RuntimeDep) -> JSONResponse:
    checks = {
        "model": _check(lambda: f"version {runtime.engine.model_version[:12]}"),
        "index": _check(
            lambda: f"{runtime.engine.indexes.fragment_count()} fragments, "
            f"{runtime.engine.indexes.phrase_count()} phrases"
        ),
        "database": _check(lambda: _ping(runtime)),
    }
    ready = all(check.ok for check in checks.values())
    body = Readiness(status="ready" if ready else "not ready", checks=checks,
                     index=index_state(runtime) if checks["database"].ok else None)
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


def index_state(runtime: Runtime) -> IndexState | None:
    """The indexes' sizes and their lag behind the change log; None when the database
    cannot be read. A lagging replica stays ready: it serves what it has."""
    indexes = runtime.engine.indexes
    try:
        with runtime.sessions() as session:
            lag = indexes.lag(session)
    except Exception:  # noqa: BLE001 (the database check reports why)
        return None
    return IndexState(fragments=indexes.fragment_count(), phrases=indexes.phrase_count(),
                      position=lag.applied, latest_position=lag.latest, lag_changes=lag.changes,
                      lag_seconds=round(lag.seconds, 3))


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
def metrics(runtime: RuntimeDep) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST

    runtime.metrics.observe_index(index_state(runtime))
    return Response(runtime.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


def _ping(runtime: Runtime) -> str:
    with runtime.database.connect() as connection:
        connection.execute(text("SELECT 1"))
    return runtime.database.dialect.name


def _check(probe: Callable[[], str]) -> ReadinessCheck:
    try:
        return ReadinessCheck(ok=True, detail=probe())
    except Exception as exc:  # noqa: BLE001 (any failure means "not ready"; its text says why)
        return ReadinessCheck(ok=False, detail=f"{type(exc).__name__}: {exc}".splitlines()[0])
