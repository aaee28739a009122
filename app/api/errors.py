"""Every error the API answers, as ``application/problem+json`` (RFC 9457), mapped in one place.

Routes and services raise domain errors (``ImageError``, ``CheckpointError``, ``LookupError``,
``ValueError``) or a :class:`Problem`; the handlers installed by :func:`install` turn each into
a problem document ``{"type", "title", "status", "detail", "instance", ...}``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
TYPE_PREFIX = "urn:artalign:problem:"
RETRY_AFTER_SECONDS = 2


class Problem(Exception):
    """An HTTP problem raised from anywhere in the service; ``slug`` names its type."""

    def __init__(
        self,
        status: int,
        slug: str,
        title: str,
        detail: str,
        *,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ):
        super().__init__(detail)
        self.status = status
        self.slug = slug
        self.title = title
        self.detail = detail
        self.headers = headers or {}
        self.extra = extra or {}


class NotFound(Problem):
    def __init__(self, what: str, key: object):
        super().__init__(404, "not-found", "Not found", f"no {what} {key!r}")


class Overloaded(Problem):
    """Every inference slot is busy: the client should come back shortly."""

    def __init__(self, inflight: int):
        super().__init__(
            503, "overloaded", "Service busy",
            f"all {inflight} inference slots are taken; retry in {RETRY_AFTER_SECONDS} s",
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
        )


class DatabaseUnavailable(Problem):
    def __init__(self, reason: str):
        super().__init__(
            503, "database-unavailable", "Database unavailable",
            f"the database cannot be reached ({reason}); retry shortly",
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
        )


def problem_response(request: Request, problem: Problem) -> JSONResponse:
    body = {
        "type": TYPE_PREFIX + problem.slug,
        "title": problem.title,
        "status": problem.status,
        "detail": problem.detail,
        "instance": request.url.path,
        **problem.extra,
    }
    return JSONResponse(body, status_code=problem.status, headers=problem.headers,
                        media_type=PROBLEM_JSON)


def to_problem(exc: BaseException) -> Problem | None:
    """The problem a domain error stands for, or None when it is a bug (answered as 500)."""
    # Imported here so that `app.api.errors` stays importable without torch or SQLAlchemy.
    from sqlalchemy.exc import DataError, DBAPIError, OperationalError
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    from collection.images import ImageError
    from models.checkpoint import CheckpointError

    if isinstance(exc, Problem):
        return exc
    if isinstance(exc, ImageError):
        return Problem(422, "unusable-image", "Unusable image", str(exc))
    if isinstance(exc, CheckpointError):
        return Problem(500, "model-unavailable", "Model unavailable", str(exc))
    if isinstance(exc, OperationalError | PoolTimeout) or (
        isinstance(exc, DBAPIError) and exc.connection_invalidated
    ):
        return DatabaseUnavailable(type(exc.__cause__ or exc).__name__)
    if isinstance(exc, DataError):
        # the database refused a value (out of range, wrong encoding): the request's fault
        return Problem(422, "invalid-input", "Invalid input",
                       f"the database refused a value: {str(exc.orig).splitlines()[0]}")
    if isinstance(exc, LookupError):
        # KeyError's str() adds quotes; the message itself is what the service wrote
        message = exc.args[0] if exc.args else "not found"
        return Problem(404, "not-found", "Not found", str(message))
    if isinstance(exc, ValueError):
        return Problem(422, "invalid-input", "Invalid input", str(exc))
    return None


def invalid_request(errors: Sequence[Mapping[str, Any]], *, where: str = "") -> Problem:
    """A 422 naming every invalid field, from pydantic's error list (``where`` prefixes each
    location, e.g. the form part or the batch position the errors come from)."""
    prefix = [where] if where else []
    fields = [
        {"field": ".".join(str(part) for part in [*prefix, *error.get("loc", ())]) or "body",
         "message": error.get("msg", "")}
        for error in errors
    ]
    detail = "; ".join(f"{f['field']}: {f['message']}" for f in fields) or "invalid request"
    return Problem(422, "invalid-request", "Invalid request", detail, extra={"errors": fields})


def install(app: FastAPI) -> None:
    """Install the handlers that answer every error as problem+json."""

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return problem_response(request, invalid_request(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # FastAPI wraps any error raised while reading a body (e.g. our body-size limit on a
        # chunked upload) into a 400; answer the original problem instead.
        cause = exc.__cause__
        if cause is not None and (problem := to_problem(cause)) is not None:
            return problem_response(request, problem)
        title = _HTTP_TITLES.get(exc.status_code, "HTTP error")
        slug = title.lower().replace(" ", "-")
        return problem_response(
            request,
            Problem(exc.status_code, slug, title, str(exc.detail), headers=dict(exc.headers or {})),
        )

    async def _domain(request: Request, exc: Exception) -> JSONResponse:
        problem = to_problem(exc)
        if problem is None:
            log.error("unhandled error on %s %s", request.method, request.url.path,
                      exc_info=exc)
            problem = Problem(500, "internal-error", "Internal error",
                              "the service failed on this request; it has been logged")
        elif problem.status >= 500:
            log.warning("%s %s: %s", request.method, request.url.path, problem.detail)
        return problem_response(request, problem)

    from sqlalchemy.exc import SQLAlchemyError

    # Registered per class (not for Exception) so that Starlette answers them in its exception
    # middleware; a bare Exception handler would run in the outermost middleware, which re-raises.
    for error_class in (Problem, ValueError, LookupError, SQLAlchemyError, Exception):
        app.add_exception_handler(error_class, _domain)


_HTTP_TITLES = {
    400: "Bad request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    406: "Not acceptable",
    413: "Content too large",
    415: "Unsupported media type",
    422: "Invalid request",
}
