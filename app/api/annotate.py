"""POST /annotate: an image crop, or a box on a stored artwork → ranked phrases."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from pydantic import ValidationError

from app.api.deps import RuntimeDep, SessionDep, content_type
from app.api.errors import Problem, invalid_request
from app.api.schemas import AnnotateBox, AnnotateResult

router = APIRouter(tags=["retrieval"])

REQUEST_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {"image": {"type": "string", "format": "binary",
                                         "description": "the crop: JPEG, PNG, TIFF, WebP, BMP or GIF"}},
                "required": ["image"],
            },
        },
        "application/json": {"schema": AnnotateBox.model_json_schema()},
    },
}


@router.post(
    "/annotate",
    response_model=AnnotateResult,
    summary="Phrases that describe an image crop, or a box on a stored artwork",
    description=(
        "Send the crop as a multipart upload (part `image`), or JSON `{artwork_id, box}` for a "
        "box on an artwork the service holds. The crop's fragment proposes the K nearest "
        "phrases by pooled vectors; stacked cross attention reranks them."
    ),
    openapi_extra={"requestBody": REQUEST_BODY},
    responses={
        404: {"description": "no such artwork"},
        413: {"description": "body over the size limit"},
        415: {"description": "neither multipart/form-data nor application/json"},
        422: {"description": "not a usable image, or an invalid box"},
        503: {"description": "busy (Retry-After) or the database is unavailable"},
    },
)
async def annotate(
    request: Request,
    runtime: RuntimeDep,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=100, description="phrases to return")] = 10,
    min_score: Annotated[float | None, Query(ge=-1, le=1, description="drop phrases scoring below")] = None,
) -> AnnotateResult:
    media_type = content_type(request)
    timings: dict[str, float] = {}
    k = max(runtime.candidates("phrases"), limit)
    if media_type == "multipart/form-data":
        image_bytes = await _uploaded_image(request)
        hits = await runtime.pool.run(runtime.engine.annotate_upload, session, image_bytes,
                                      max_pixels=runtime.settings.limits.max_image_pixels,
                                      k=k, limit=limit, timings=timings)
    elif media_type == "application/json":
        target = _parse_box(await request.body())
        hits = await runtime.pool.run(runtime.engine.annotate_box, session, target.artwork_id,
                                      target.box, k=k, limit=limit, timings=timings)
    else:
        raise Problem(415, "unsupported-media-type", "Unsupported media type",
                      f"Content-Type {media_type or '(none)'!r}: send multipart/form-data with an "
                      "'image' part, or application/json {\"artwork_id\", \"box\"}")
    runtime.metrics.observe_stages(timings)
    kept = [hit for hit in hits if min_score is None or hit.score >= min_score]
    return AnnotateResult(items=kept)


async def _uploaded_image(request: Request) -> bytes:
    form = await request.form(max_files=1, max_fields=10)
    upload = form.get("image")
    if upload is None or isinstance(upload, str):
        raise Problem(422, "missing-image", "Missing image",
                      "the multipart body needs a file part named 'image'")
    return await upload.read()


def _parse_box(body: bytes) -> AnnotateBox:
    try:
        return AnnotateBox.model_validate_json(body)
    except ValidationError as exc:
        raise invalid_request(exc.errors()) from None
