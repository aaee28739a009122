"""Dependencies: how a route reaches the runtime (settings, engine, pool), a database session
and the caller's API key."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Query, Request, Security
from fastapi.security import APIKeyHeader
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.api.errors import Problem
from app.runtime import Runtime
from app.services.filters import ArtworkFilter
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


METADATA_FIELD = re.compile(r"^\w[\w .-]{0,99}$")  # a metadata field's name as a filter names it
MAX_FILTERS = 20


def check_field_name(name: str, where: str) -> str:
    if not METADATA_FIELD.match(name):
        raise Problem(422, "invalid-filter", "Invalid filter",
                      f"{where}: {name!r} is not a metadata field name (letters, digits, _ . - "
                      "and spaces, at most 100)")
    return name


def get_artwork_filter(
    filters: Annotated[list[str] | None, Query(
        alias="filter", description="`field:value`: only artworks whose metadata field holds the "
        "value (compared as text). Repeat it: values of one field are alternatives, different "
        "fields must all hold.", examples=["classification:vase"])] = None,
    source: Annotated[str | None, Query(max_length=200, description="shorthand for filter=source:…")] = None,
    classification: Annotated[str | None, Query(
        max_length=200, description="shorthand for filter=classification:…")] = None,
    title: Annotated[str | None, Query(max_length=200, description="only artworks whose title "
                                       "contains this text (any case)")] = None,
) -> ArtworkFilter:
    """The metadata filter of a listing, a search or a facet count."""
    pairs = [item.split(":", 1) if ":" in item else [item] for item in filters or []]
    pairs += [["source", source]] if source is not None else []
    pairs += [["classification", classification]] if classification is not None else []
    if len(pairs) > MAX_FILTERS:
        raise Problem(422, "invalid-filter", "Invalid filter",
                      f"{len(pairs)} filters; at most {MAX_FILTERS}")
    fields: dict[str, tuple[str, ...]] = {}
    for pair in pairs:
        if len(pair) != 2 or len(pair[1]) > 200:
            raise Problem(422, "invalid-filter", "Invalid filter",
                          f"filter {':'.join(pair)!r}: write field:value (a value of at most 200 characters)")
        name = check_field_name(pair[0], "filter")
        fields[name] = (*fields.get(name, ()), pair[1])
    return ArtworkFilter(fields, title or None)


FilterDep = Annotated[ArtworkFilter, Depends(get_artwork_filter)]
