"""Request and response models: the shapes in the OpenAPI document, with examples.

Hits hold the service's own hit types (:mod:`app.services.hits`), which pydantic validates
and documents as they are: there is one definition of a phrase hit or a word's attention.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from app.services.hits import AttributeScore, PhraseHit, WordAttention

MAX_ID = 2**63 - 1  # ids are BIGINT: a larger number names nothing
BOX_DESCRIPTION = "[x1, y1, x2, y2] in the artwork's original pixels, x1 < x2, y1 < y2"


def _valid_box(box: list[float]) -> list[float]:
    x1, y1, x2, y2 = box
    if not all(math.isfinite(v) for v in box):
        raise ValueError("box coordinates must be finite numbers")
    if min(box) < 0 or not (x1 < x2 and y1 < y2):
        raise ValueError(f"box {box} must be [x1, y1, x2, y2] with 0 <= x1 < x2 and 0 <= y1 < y2")
    return box


Box = Annotated[
    list[float],
    Field(min_length=4, max_length=4, description=BOX_DESCRIPTION, examples=[[12, 40, 96, 120]]),
]
BoxIn = Annotated[Box, AfterValidator(_valid_box)]
Metadata = Annotated[
    dict[str, Any],
    Field(description="the museum's own fields", examples=[{"source": "synth", "classification": "vase"}]),
]


class Health(BaseModel):
    status: Literal["ok"]


class ReadinessCheck(BaseModel):
    ok: bool
    detail: str


class IndexState(BaseModel):
    """What the serving indexes hold and how far they are behind the database's change log."""

    fragments: int = Field(description="fragment vectors in the index")
    phrases: int = Field(description="phrase vectors in the index")
    position: int = Field(description="the change-log position the indexes reflect")
    latest_position: int = Field(description="the newest position in the database's log")
    lag_changes: int = Field(description="committed changes not applied yet")
    lag_seconds: float = Field(description="age of the oldest of them; 0 when caught up")


class Readiness(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "status": "ready",
        "checks": {"model": {"ok": True, "detail": "version 3f2a9c01be77"},
                   "index": {"ok": True, "detail": "5120 fragments, 812 phrases"},
                   "database": {"ok": True, "detail": "postgresql"}},
        "index": {"fragments": 5120, "phrases": 812, "position": 931, "latest_position": 933,
                  "lag_changes": 2, "lag_seconds": 0.4},
    }]})

    status: Literal["ready", "not ready"]
    checks: dict[str, ReadinessCheck]
    index: IndexState | None = Field(
        None, description="the indexes against the change log; null when the database cannot "
        "be read (a replica still serves what it has)")


# --- artworks ---------------------------------------------------------------------------


class ArtworkSummary(BaseModel):
    id: int = Field(examples=[17])
    external_id: str = Field(examples=["synth-000123"])
    title: str = Field(examples=["Blue porcelain vase with two gold birds"])
    metadata: Metadata
    width: int
    height: int
    image_url: str = Field(examples=["/artworks/17/image"])
    thumbnail_url: str = Field(examples=["/artworks/17/thumbnail"])


ALSO_DESCRIPTION = ("ids of the artwork's fragments folded into this one: they score lower and "
                    "their boxes overlap it (IoU at or above the service's fold_iou), or, with "
                    "per_artwork, they are anywhere on the same artwork")
ATTRIBUTES_DESCRIPTION = ("the detector's most probable attribute words for the box, with their "
                          "probabilities (empty when the detector has no attribute head)")


class FragmentOut(BaseModel):
    id: int
    box: Box
    source: Literal["whole", "extracted", "annotation", "crop"]
    also: list[int] = Field(description=ALSO_DESCRIPTION)
    attributes: list[AttributeScore] = Field(description=ATTRIBUTES_DESCRIPTION)


class ArtworkDetail(ArtworkSummary):
    captions: list[str] = Field(examples=[["A blue porcelain vase with two gold birds."]])
    phrases: list[str] = Field(examples=[["blue porcelain vase", "two gold birds"]])
    fragments: list[FragmentOut] = Field(
        description="one per thing, the most confident first (annotations, then detections by "
                    "score): overlapping fragments fold into it (`also`)")


class ArtworkPage(BaseModel):
    items: list[ArtworkSummary]
    total: int = Field(description="artworks matching the filter, over all pages")
    limit: int
    offset: int


class FacetValue(BaseModel):
    value: str
    count: int = Field(description="artworks holding the value that the other filters keep")


class Facets(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "total": 120, "fields": {"classification": [{"value": "vase", "count": 41},
                                                    {"value": "box", "count": 30}]}}]})

    total: int = Field(description="artworks the whole filter keeps")
    fields: dict[str, list[FacetValue]] = Field(
        description="per metadata field, its most frequent values and their counts under the "
                    "filter without that field's own condition (so its values stay alternatives)")


class AnnotationIn(BaseModel):
    phrase: str = Field(min_length=1, max_length=500, examples=["two gold birds"])
    box: BoxIn


class ArtworkIn(BaseModel):
    """An artwork's text; the image travels beside it as its own multipart part."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "external_id": "synth-000123",
        "title": "Blue porcelain vase",
        "metadata": {"source": "synth", "classification": "vase"},
        "captions": ["A blue porcelain vase with two gold birds among clouds."],
        "annotations": [{"phrase": "two gold birds", "box": [40, 52, 120, 110]}],
    }]})

    external_id: str = Field(min_length=1, max_length=200, pattern=r"^\S(.*\S)?$",
                             description="the museum's own id, unique")
    title: str = Field("", max_length=2000)
    metadata: Metadata = Field(default_factory=dict)
    captions: list[Annotated[str, Field(min_length=1, max_length=5000)]] = Field(
        default_factory=list, max_length=5, description="at most five sentences")
    annotations: list[AnnotationIn] = Field(default_factory=list, max_length=200)


class IngestReport(BaseModel):
    id: int
    external_id: str
    status: Literal["created", "replaced", "unchanged"]
    fragments: int = Field(description="fragments of the artwork now in the index")
    phrases: int = Field(description="phrases that describe the artwork")
    url: str = Field(examples=["/artworks/17"])


class BatchItemReport(BaseModel):
    position: int = Field(description="0-based position of the item in the request")
    external_id: str | None
    status: Literal["created", "replaced", "unchanged", "failed"]
    id: int | None = None
    error: str | None = Field(None, description="why the item failed (the others still count)")


class BatchReport(BaseModel):
    items: list[BatchItemReport]
    counts: dict[str, int] = Field(examples=[{"created": 3, "unchanged": 1, "failed": 1}])


class BatchItemIn(ArtworkIn):
    """One line of a batch: an artwork and its image file, base64-encoded."""

    image_base64: str = Field(min_length=1, description="the image file's bytes, base64")


class DeleteReport(BaseModel):
    external_id: str
    deleted: bool


# --- search and annotate ---------------------------------------------------------------


class SearchHit(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "fragment_id": 4512, "artwork_id": 17, "external_id": "synth-000123",
        "title": "Blue porcelain vase", "box": [40, 52, 120, 110], "score": 0.71,
        "crop_url": "/fragments/4512/image", "image_url": "/artworks/17/image",
        "thumbnail_url": "/artworks/17/thumbnail", "width": 256, "height": 256,
        "also": [4519], "attributes": [{"word": "gold", "score": 0.93}, {"word": "birds", "score": 0.88}],
        "attention": [{"word": "birds", "regions": [{"box": [44, 56, 80, 100], "weight": 0.62},
                                                    {"box": [40, 52, 120, 110], "weight": 0.38}]}],
    }]})

    fragment_id: int
    artwork_id: int
    external_id: str
    title: str
    box: Box
    score: float = Field(description="SCAN cross-attention similarity; higher is better")
    crop_url: str = Field(examples=["/fragments/4512/image"])
    image_url: str = Field(examples=["/artworks/17/image"])
    thumbnail_url: str = Field(examples=["/artworks/17/thumbnail"],
                               description="a small JPEG of the whole artwork, same aspect ratio")
    width: int = Field(description="the artwork image's width in pixels")
    height: int
    attention: list[WordAttention] = Field(
        description="for each query word, the fragment's regions it attended to")
    also: list[int] = Field(description=ALSO_DESCRIPTION)
    attributes: list[AttributeScore] = Field(description=ATTRIBUTES_DESCRIPTION)


class SearchPage(BaseModel):
    query: str
    phrases: list[str] = Field(
        description="the noun phrases of the query that were scored (or the whole query)")
    whole_query: bool = Field(
        description="true when the query named no noun phrase and was searched as one text")
    unknown_words: list[str] = Field(
        description="query words the model cannot use (outside its vocabulary); always empty "
                    "for the pretrained MiniLM text encoder")
    items: list[SearchHit]
    limit: int
    offset: int


class AnnotateResult(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"items": [{
        "phrase_id": 88, "phrase": "two gold birds", "score": 0.64,
        "artworks": [{"id": 17, "external_id": "synth-000123", "title": "Blue porcelain vase"}],
    }]}]})

    items: list[PhraseHit] = Field(description="phrases, best first, with artworks they describe")


class AnnotateBox(BaseModel):
    """A box on a stored artwork, instead of an uploaded crop."""

    model_config = ConfigDict(extra="forbid",
                              json_schema_extra={"examples": [{"artwork_id": 17, "box": [40, 52, 120, 110]}]})

    artwork_id: int = Field(ge=1, le=MAX_ID)
    box: BoxIn


class AnnotationCreate(BaseModel):
    """A phrase a curator accepted for a box on an artwork."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"artwork_id": 17, "box": [40, 52, 120, 110], "phrase": "two gold birds"}]})

    artwork_id: int = Field(ge=1, le=MAX_ID)
    box: BoxIn
    phrase: str = Field(min_length=1, max_length=500)


class AnnotationOut(BaseModel):
    id: int
    artwork_id: int
    phrase: str
    box: Box
    source: Literal["ground_truth", "curator"]


# --- W3C Web Annotation (JSON-LD) -------------------------------------------------------


class FragmentSelector(BaseModel):
    type: Literal["FragmentSelector"] = "FragmentSelector"
    conformsTo: Literal["http://www.w3.org/TR/media-frags/"] = "http://www.w3.org/TR/media-frags/"
    value: str = Field(examples=["xywh=40,52,80,58"])


class WebAnnotationTarget(BaseModel):
    source: str
    selector: FragmentSelector


class TextualBody(BaseModel):
    type: Literal["TextualBody"] = "TextualBody"
    value: str
    purpose: Literal["describing", "tagging"] = "describing"
    language: str = "en"


class WebAnnotation(BaseModel):
    id: str
    type: Literal["Annotation"] = "Annotation"
    motivation: Literal["describing", "tagging"]
    body: TextualBody
    target: WebAnnotationTarget
    score: float | None = Field(None, description="model score of a suggestion (not part of W3C)")


class AnnotationPage(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    context: Literal["http://www.w3.org/ns/anno.jsonld"] = Field(
        "http://www.w3.org/ns/anno.jsonld", alias="@context")
    id: str
    type: Literal["AnnotationPage"] = "AnnotationPage"
    items: list[WebAnnotation]
