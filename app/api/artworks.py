"""Artworks: a museum back end writes them (API key), the curator page and clients read them.

Writes are addressed by the museum's own ``external_id`` and are idempotent: sending the same
artwork twice changes nothing (reported "unchanged"); sending new content replaces it.
Reads are addressed by the service's numeric ``id`` (what search hits and pages link to).
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import replace
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, File, Form, Path, Query, Request, Response, UploadFile
from fastapi.responses import FileResponse
from pydantic import ValidationError
from sqlalchemy.orm import Session

from app.api.deps import FilterDep, RuntimeDep, SessionDep, WriterDep, content_type
from app.api.errors import NotFound, Problem, invalid_request, to_problem
from app.api.schemas import (
    MAX_ID,
    AnnotationCreate,
    AnnotationOut,
    AnnotationPage,
    ArtworkDetail,
    ArtworkIn,
    ArtworkPage,
    ArtworkSummary,
    BatchItemIn,
    BatchItemReport,
    BatchReport,
    DeleteReport,
    FragmentOut,
    FragmentSelector,
    IngestReport,
    TextualBody,
    WebAnnotation,
    WebAnnotationTarget,
)
from app.db.models import Artwork
from app.runtime import Runtime
from app.services import catalog

router = APIRouter(tags=["artworks"])

NOT_FOUND = {404: {"description": "no such artwork"}}
WRITE_ERRORS = {
    401: {"description": "no X-API-Key header"},
    403: {"description": "the key is unknown or revoked"},
    413: {"description": "body over the size limit"},
    415: {"description": "wrong Content-Type"},
    422: {"description": "invalid artwork JSON, or an unusable image"},
    503: {"description": "busy (Retry-After) or the database is unavailable"},
}
ExternalId = Annotated[str, Path(min_length=1, max_length=200, description="the museum's own id")]
ArtworkId = Annotated[int, Path(ge=1, le=MAX_ID, description="the service's artwork id")]
ARTWORK_FIELD_DESCRIPTION = (
    'the artwork as JSON: {"external_id", "title", "metadata", "captions": [...], '
    '"annotations": [{"phrase", "box"}]}'
)


def require_media_type(*accepted: str) -> Any:
    """A dependency refusing bodies of another Content-Type with 415 before they are parsed."""

    def check(request: Request) -> None:
        media_type = content_type(request)
        if media_type not in accepted:
            raise Problem(415, "unsupported-media-type", "Unsupported media type",
                          f"Content-Type {media_type or '(none)'!r}: send {' or '.join(accepted)}")

    return Depends(check)


MULTIPART = require_media_type("multipart/form-data")


# --- writes, by external id ---------------------------------------------------------------


@router.post(
    "/artworks", response_model=IngestReport, status_code=201, dependencies=[MULTIPART],
    summary="Create an artwork (or replace the one with the same external_id)",
    responses={200: {"model": IngestReport, "description": "replaced or unchanged"}, **WRITE_ERRORS},
)
async def create_artwork(
    runtime: RuntimeDep, session: SessionDep, _key: WriterDep, response: Response,
    image: Annotated[UploadFile, File(description="the image file")],
    artwork: Annotated[str, Form(description=ARTWORK_FIELD_DESCRIPTION)],
) -> IngestReport:
    item = _parse_artwork(artwork)
    report = await runtime.pool.run(_ingest, runtime, session, item, await image.read())
    response.status_code = 201 if report.status == "created" else 200
    return report


@router.put(
    "/artworks/external/{external_id}", response_model=IngestReport, dependencies=[MULTIPART],
    summary="Create or replace the artwork with this external id",
    responses={201: {"model": IngestReport, "description": "created"}, **WRITE_ERRORS},
)
async def put_artwork(
    runtime: RuntimeDep, session: SessionDep, _key: WriterDep, response: Response,
    external_id: ExternalId,
    image: Annotated[UploadFile, File(description="the image file")],
    artwork: Annotated[str, Form(description=ARTWORK_FIELD_DESCRIPTION + "; external_id may be left out")],
) -> IngestReport:
    item = _parse_artwork(artwork, external_id=external_id)
    report = await runtime.pool.run(_ingest, runtime, session, item, await image.read())
    response.status_code = 201 if report.status == "created" else 200
    return report


@router.delete(
    "/artworks/external/{external_id}", response_model=DeleteReport,
    summary="Remove the artwork with this external id, its fragments and its orphan phrases",
    responses={**NOT_FOUND, **{s: WRITE_ERRORS[s] for s in (401, 403, 503)}},
)
async def delete_artwork(
    runtime: RuntimeDep, session: SessionDep, _key: WriterDep, external_id: ExternalId,
) -> DeleteReport:
    from app.services.ingest import delete_artwork as delete

    def run() -> bool:
        with runtime.write_lock:
            return delete(session, external_id=external_id, indexes=runtime.engine.indexes)

    if not await runtime.pool.run(run):
        raise NotFound("artwork with external_id", external_id)
    return DeleteReport(external_id=external_id, deleted=True)


@router.get(
    "/artworks/external/{external_id}", response_model=ArtworkDetail, responses=NOT_FOUND,
    summary="An artwork by the museum's own id",
)
def get_artwork_by_external_id(
    runtime: RuntimeDep, session: SessionDep, external_id: ExternalId
) -> ArtworkDetail:
    from sqlalchemy import select

    artwork_id = session.scalar(select(Artwork.id).where(Artwork.external_id == external_id))
    if artwork_id is None:
        raise NotFound("artwork with external_id", external_id)
    return _detail(runtime, session, artwork_id)


@router.post(
    "/artworks/batch", response_model=BatchReport,
    summary="Create or replace many artworks: NDJSON or a JSON list, one report per item",
    description=(
        "Each item is an artwork (as in POST /artworks) with its image file base64-encoded in "
        "`image_base64`. Items are ingested one by one; a bad item is reported and the others "
        "still go in."
    ),
    openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"type": "array", "items": BatchItemIn.model_json_schema()}},
        "application/x-ndjson": {"schema": {"type": "string",
                                            "description": "one BatchItem JSON object per line"}},
    }}},
    responses=WRITE_ERRORS,
)
async def batch(
    request: Request, runtime: RuntimeDep, session: SessionDep, _key: WriterDep
) -> BatchReport:
    media_type = content_type(request)
    body = await request.body()
    if media_type == "application/json":
        try:
            raw_items = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise Problem(422, "invalid-json", "Invalid JSON", f"body: {exc}") from None
        if not isinstance(raw_items, list):
            raise Problem(422, "invalid-request", "Invalid request",
                          "body: a JSON list of artworks is expected")
    elif media_type == "application/x-ndjson":
        raw_items = _ndjson_lines(body)
    else:
        raise Problem(415, "unsupported-media-type", "Unsupported media type",
                      f"Content-Type {media_type or '(none)'!r}: send application/json (a list) "
                      "or application/x-ndjson (one artwork per line)")
    limit = runtime.settings.limits.max_batch_items
    if len(raw_items) > limit:
        raise Problem(413, "too-many-items", "Too many items",
                      f"{len(raw_items)} artworks in one batch; the limit is {limit}")
    items = await runtime.pool.run(_ingest_batch, runtime, session, raw_items)
    counts: dict[str, int] = {}
    for item in items:
        counts[item.status] = counts.get(item.status, 0) + 1
    return BatchReport(items=items, counts=counts)


# --- reads, by id ------------------------------------------------------------------------


@router.get("/artworks", response_model=ArtworkPage, summary="Artworks, a page at a time",
            description="Filtered in the database: `q` (title or external id), `title`, and "
                        "metadata values (`filter=field:value`, repeatable; `source`, "
                        "`classification`). GET /facets counts the values under the same filter.")
def list_artworks(
    runtime: RuntimeDep,
    session: SessionDep,
    filters: FilterDep,
    q: Annotated[str | None, Query(max_length=200, description="text in the title or external id")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
) -> ArtworkPage:
    artworks, total = catalog.list_artworks(session, filters=replace(filters, text=q), limit=limit,
                                            offset=offset)
    return ArtworkPage(items=[_summary(runtime, a) for a in artworks], total=total,
                       limit=limit, offset=offset)


@router.get("/artworks/{artwork_id}", response_model=ArtworkDetail, responses=NOT_FOUND,
            summary="An artwork with its captions, phrases and fragments")
def get_artwork(runtime: RuntimeDep, session: SessionDep, artwork_id: ArtworkId) -> ArtworkDetail:
    return _detail(runtime, session, artwork_id)


@router.get(
    "/artworks/{artwork_id}/image", response_class=FileResponse, summary="The artwork's image file",
    responses={200: {"content": {"image/*": {"schema": {"type": "string", "format": "binary"}}}},
               **NOT_FOUND},
)
def get_image(session: SessionDep, artwork_id: ArtworkId) -> FileResponse:
    path = catalog.image_path(catalog.get_artwork(session, artwork_id))
    return FileResponse(path, headers={"Cache-Control": "public, max-age=86400"})


@router.get(
    "/artworks/{artwork_id}/thumbnail", response_class=FileResponse,
    summary=f"A small JPEG of the artwork (at most {catalog.THUMBNAIL_SIDE} px a side)",
    responses={200: {"content": {"image/jpeg": {"schema": {"type": "string", "format": "binary"}}}},
               **NOT_FOUND},
)
def get_thumbnail(runtime: RuntimeDep, session: SessionDep, artwork_id: ArtworkId) -> FileResponse:
    artwork = catalog.get_artwork(session, artwork_id)
    path = catalog.thumbnail(artwork, runtime.settings.data_dir)
    return FileResponse(path, media_type="image/jpeg",
                        headers={"Cache-Control": "public, max-age=86400"})


@router.get(
    "/fragments/{fragment_id}/image", summary="A fragment's crop as JPEG",
    response_class=Response,
    responses={200: {"content": {"image/jpeg": {"schema": {"type": "string", "format": "binary"}}}},
               404: {"description": "no such fragment"}},
)
def get_fragment_image(
    session: SessionDep, fragment_id: Annotated[int, Path(ge=1, le=MAX_ID)]
) -> Response:
    jpeg = catalog.crop_jpeg(catalog.get_fragment(session, fragment_id))
    return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "public, max-age=86400"})


@router.get(
    "/artworks/{artwork_id}/annotations", response_model=AnnotationPage, response_model_by_alias=True,
    summary="Annotations of an artwork as a W3C Web Annotation page (JSON-LD)",
    description=(
        "Stored annotations (ground truth and curator-accepted; motivation `describing`) and, "
        "for the artwork's `suggestions` most confident extracted fragments, the model's best "
        "phrase (motivation `tagging`, with its score). Targets use IIIF-compatible "
        "`xywh=x,y,w,h` fragment selectors on the image URL."
    ),
    responses={**NOT_FOUND, 200: {"content": {"application/ld+json": {}}}},
)
async def get_annotations(
    runtime: RuntimeDep, session: SessionDep, artwork_id: ArtworkId,
    suggestions: Annotated[int, Query(ge=0, le=20, description="model suggestions to add")] = 3,
) -> AnnotationPage:
    return await runtime.pool.run(_annotation_page, runtime, session, artwork_id, suggestions)


@router.post(
    "/annotations", response_model=AnnotationOut, status_code=201,
    dependencies=[require_media_type("application/json")],
    summary="Store a phrase a curator accepted for a box on an artwork",
    responses={**NOT_FOUND, **WRITE_ERRORS},
)
async def create_annotation(
    runtime: RuntimeDep, session: SessionDep, _key: WriterDep, body: AnnotationCreate
) -> AnnotationOut:
    def run() -> Any:
        with runtime.write_lock:
            return catalog.accept_annotation(session, engine=runtime.engine,
                                             artwork_id=body.artwork_id, box=body.box,
                                             phrase=body.phrase)

    annotation = await runtime.pool.run(run)
    return AnnotationOut(id=annotation.id, artwork_id=annotation.artwork_id,
                         phrase=annotation.phrase.text, box=list(annotation.box),
                         source=annotation.source)


# --- helpers -----------------------------------------------------------------------------


def _parse_artwork(text: str, *, external_id: str | None = None) -> ArtworkIn:
    """The multipart 'artwork' part; a PUT's path id fills in or must equal the JSON's."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise Problem(422, "invalid-json", "Invalid JSON", f"artwork: {exc}") from None
    if external_id is not None and isinstance(raw, dict):
        given = raw.setdefault("external_id", external_id)
        if given != external_id:
            raise Problem(422, "external-id-mismatch", "External id mismatch",
                          f"artwork.external_id {given!r} differs from the path's {external_id!r}")
    try:
        return ArtworkIn.model_validate(raw)
    except ValidationError as exc:
        raise invalid_request(exc.errors(), where="artwork") from None


def _ingest(runtime: Runtime, session: Session, item: ArtworkIn, image_bytes: bytes) -> IngestReport:
    from app.services.ingest import decode_image, detect_regions, ingest_artwork

    annotations = [a.model_dump() for a in item.annotations]
    engine = runtime.engine
    with runtime.metrics.stage("ingest"):
        # Decoding and the detector pass, the slow parts, run outside the write lock, so
        # concurrent uploads overlap; only the store append, the rows and the index change
        # are serialised.
        image = decode_image(item.external_id, image_bytes, runtime.settings.limits.max_image_pixels)
        record = detect_regions(engine.extractor, engine.store, image=image,
                                image_bytes=image_bytes, annotations=annotations)
        with runtime.write_lock:
            result = ingest_artwork(
                session, extractor=engine.extractor, store=engine.store,
                external_id=item.external_id, image_bytes=image_bytes, image=image,
                title=item.title, metadata=item.metadata, captions=item.captions,
                annotations=annotations, record=record, image_dir=engine.image_dir,
                indexes=engine.indexes,
            )
    return IngestReport(id=result.artwork_id, external_id=result.external_id, status=result.status,
                        fragments=result.fragments, phrases=result.phrases,
                        url=runtime.url(f"/artworks/{result.artwork_id}"))


def _ndjson_lines(body: bytes) -> list[Any]:
    items = []
    for number, line in enumerate(body.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            items.append(json.loads(line))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise Problem(422, "invalid-json", "Invalid JSON", f"line {number}: {exc}") from None
    return items


def _ingest_batch(runtime: Runtime, session: Session, raw_items: list[Any]) -> list[BatchItemReport]:
    reports = []
    for position, raw in enumerate(raw_items):
        external_id = raw.get("external_id") if isinstance(raw, dict) else None
        external_id = external_id if isinstance(external_id, str) else None
        try:
            item = BatchItemIn.model_validate(raw)
            try:
                image_bytes = base64.b64decode(item.image_base64, validate=True)
            except (binascii.Error, ValueError):
                raise ValueError("image_base64 is not valid base64") from None
            artwork = ArtworkIn.model_validate(item.model_dump(exclude={"image_base64"}))
            report = _ingest(runtime, session, artwork, image_bytes)
        except ValidationError as exc:
            problem = invalid_request(exc.errors(), where=f"[{position}]")
            reports.append(BatchItemReport(position=position, external_id=external_id,
                                           status="failed", error=problem.detail))
            continue
        except Exception as exc:
            problem = to_problem(exc)
            if problem is None or problem.status >= 500:
                raise  # the service (not the item) failed: the whole request answers for it
            reports.append(BatchItemReport(position=position, external_id=external_id,
                                           status="failed", error=problem.detail))
            continue
        reports.append(BatchItemReport(position=position, external_id=report.external_id,
                                       status=report.status, id=report.id))
    return reports


def _summary(runtime: Runtime, artwork: Artwork) -> ArtworkSummary:
    return ArtworkSummary(
        id=artwork.id, external_id=artwork.external_id, title=artwork.title,
        metadata=artwork.meta or {}, width=artwork.width, height=artwork.height,
        image_url=runtime.url(f"/artworks/{artwork.id}/image"),
        thumbnail_url=runtime.url(f"/artworks/{artwork.id}/thumbnail"),
    )


def _detail(runtime: Runtime, session: Session, artwork_id: int) -> ArtworkDetail:
    from app.services.explain import attribute_words

    artwork = catalog.get_artwork(session, artwork_id, full=True)
    shown = catalog.shown_fragments(artwork, fold_iou=runtime.settings.retrieval.fold_iou)
    engine = runtime.engine
    seen = attribute_words(engine.attribute_detector, engine.store.features(
        np.asarray([f.region_rows[0] for f, _ in shown], dtype=np.int64)))
    return ArtworkDetail(
        **_summary(runtime, artwork).model_dump(),
        captions=[caption.text for caption in artwork.captions],
        phrases=catalog.phrases_of(session, artwork_id),
        fragments=[FragmentOut(id=f.id, box=list(f.box), source=f.source, also=also, attributes=words)
                   for (f, also), words in zip(shown, seen, strict=True)],
    )


def _xywh(box: tuple[float, float, float, float]) -> str:
    x1, y1, x2, y2 = (round(v) for v in box)
    return f"xywh={x1},{y1},{max(1, x2 - x1)},{max(1, y2 - y1)}"


def _annotation_page(runtime: Runtime, session: Session, artwork_id: int,
                     suggestions: int) -> AnnotationPage:
    artwork = catalog.get_artwork(session, artwork_id, full=True)
    image_url = runtime.url(f"/artworks/{artwork_id}/image")
    page_url = runtime.url(f"/artworks/{artwork_id}/annotations")

    def web_annotation(suffix: str, motivation: str, phrase: str,
                       box: tuple[float, float, float, float], score: float | None = None) -> WebAnnotation:
        return WebAnnotation(
            id=f"{page_url}#{suffix}", motivation=motivation,
            body=TextualBody(value=phrase, purpose="describing" if motivation == "describing" else "tagging"),
            target=WebAnnotationTarget(source=image_url, selector=FragmentSelector(value=_xywh(box))),
            score=score,
        )

    items = [web_annotation(f"annotation-{a.id}", "describing", a.phrase.text, a.box)
             for a in catalog.annotations_of(session, artwork_id)]
    if suggestions:
        score_of_row = {region.store_row: region.score for region in artwork.regions}
        extracted = sorted((f for f in artwork.fragments if f.source == "extracted"),
                           key=lambda f: (-score_of_row.get(f.region_rows[0], 0.0), f.id))
        engine = runtime.engine
        for fragment in extracted[:suggestions]:
            features = engine.store.features(np.asarray(fragment.region_rows))  # (r, D_raw)
            best = engine.annotate_regions(session, features, k=runtime.candidates("phrases"), limit=1)
            if best:
                items.append(web_annotation(f"suggestion-{fragment.id}", "tagging", best[0].phrase,
                                            fragment.box, score=best[0].score))
    return AnnotationPage(id=page_url, items=items)
