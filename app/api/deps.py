"""Dependencies: how a route reaches the runtime (settings, engine, pool), a database session
and the caller's API key."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.api.errors import Problem
from app.runtime import Runtime
from app.settings import hash_api_key


def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


def get_session(runtime: RuntimeDep) -> Iterator[Session]:
    with runtime.sessions() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


def content_type(request: Request) -> str:
    """The request's media type, lower-cased, without parameters ("" when none was sent)."""
    return request.headers.get("content-type", "").split(";")[0].strip().lower()

api_key_header = APIKeyHeader(
    name="X-API-Key", auto_error=False,
    description="A key given by the service's operator; every write needs one.",
)


def require_api_key(
    runtime: RuntimeDep, session: SessionDep,
    key: Annotated[str | None, Security(api_key_header)] = None,
) -> str:
    """The sha256 of a valid key (from the settings, or a non-revoked row of ``api_keys``)."""
    from app.db.models import ApiKey

    if not key:
        raise Problem(401, "missing-api-key", "API key required",
                      "this request writes; send a key in the X-API-Key header",
                      headers={"WWW-Authenticate": "X-API-Key"})
    digest = hash_api_key(key)
    if digest in runtime.key_hashes:
        return digest
    stored = session.scalar(
        select(ApiKey.id).where(ApiKey.key_sha256 == digest, ApiKey.revoked.is_(False))
    )
    if stored is None:
        raise Problem(403, "invalid-api-key", "Invalid API key",
                      "the X-API-Key header holds no valid key (unknown or revoked)")
    return digest


WriterDep = Annotated[str, Depends(require_api_key)]
