"""POST /annotate: an image crop, or a box on a stored artwork → ranked phrases."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Annotated

import numpy as np
from fastapi import APIRouter, Query, Request
from PIL import Image
from pydantic import ValidationError
from sqlalchemy.orm import Session

from app.api.deps import RuntimeDep, SessionDep
from app.api.errors import Problem
from app.api.schemas import AnnotateBox, AnnotateResult, PhraseArtwork, PhraseHit
from app.main import Runtime

if TYPE_CHECKING:
    from app.services.retrieval import PhraseHit as EnginePhraseHit
    from models.regions import RegionExtractor

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
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    timings: dict[str, float] = {}
    k = max(runtime.settings.retrieval.candidates, limit)
    if media_type == "multipart/form-data":
        image_bytes = await _uploaded_image(request)
        hits = await runtime.pool.run(_annotate_upload, runtime, session, image_bytes,
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
    return AnnotateResult(items=[_phrase_hit(hit) for hit in kept])


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
        errors = [{"field": ".".join(str(p) for p in e["loc"]) or "body", "message": e["msg"]}
                  for e in exc.errors()]
        raise Problem(422, "invalid-request", "Invalid request",
                      "; ".join(f"{e['field']}: {e['message']}" for e in errors),
                      extra={"errors": errors}) from None


def _annotate_upload(runtime: Runtime, session: Session, image_bytes: bytes, *, k: int,
                     limit: int, timings: dict[str, float]) -> list[EnginePhraseHit]:
    from collection.images import load_image

    with runtime.metrics.stage("decode"):
        crop = load_image(image_bytes, max_pixels=runtime.settings.limits.max_image_pixels,
                          name="uploaded image")
    start = time.perf_counter()
    features = crop_region_set(runtime.engine.extractor, crop)
    timings["extract"] = time.perf_counter() - start
    return runtime.engine.annotate_regions(session, features, k=k, limit=limit, timings=timings)


def crop_region_set(extractor: RegionExtractor, crop: Image.Image) -> np.ndarray:
    """(r, D_raw) raw features of an uploaded crop's fragment: the crop's own box pooled, then
    the regions detected inside it (index.fragments' region set of a "crop" fragment).

    The detector resizes every image so that its longer side is ``image_size``: a small crop
    alone would be magnified several times and look like nothing it learnt from, and its
    whole-image feature describes an artwork, not a detail. So the crop is laid, at its own
    scale, on a canvas of that size filled with its mean border colour, as it lay on its
    artwork, and its box is pooled there.
    """
    from index.fragments import GIVEN, fragments_of

    width, height = crop.size
    side = max(extractor.config.image_size, width, height)
    pixels = np.asarray(crop, dtype=np.float32)  # (h, w, 3)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])  # (2w + 2h, 3)
    canvas = Image.new("RGB", (side, side), tuple(int(v) for v in border.mean(axis=0)))
    left, top = (side - width) // 2, (side - height) // 2
    canvas.paste(crop, (left, top))
    box = np.array([[left, top, left + width, top + height]], dtype=np.float32)
    record = extractor.extract([canvas], extra_boxes=[box], extra_kind=GIVEN)[0]
    fragment = next(spec for spec in fragments_of(record.boxes, record.scores, record.kinds)
                    if spec.source == "crop")
    return np.asarray(record.features, dtype=np.float32)[fragment.rows]


def _phrase_hit(hit: EnginePhraseHit) -> PhraseHit:
    return PhraseHit(
        phrase_id=hit.phrase_id, phrase=hit.phrase, score=hit.score,
        artworks=[PhraseArtwork(id=a.id, external_id=a.external_id, title=a.title)
                  for a in hit.artworks],
    )
