"""GET /search: text → ranked image fragments, with the regions each word attended to."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Query

from app.api.deps import FilterDep, RuntimeDep, SessionDep
from app.api.errors import Problem
from app.api.schemas import SearchHit, SearchPage
from app.runtime import Runtime
from app.services.hits import FragmentHit

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from app.services.query import ParsedQuery
    from app.services.retrieval import Engine

router = APIRouter(tags=["retrieval"])
# A fold threshold every pair of boxes meets (IoU >= 0): all fragments of an artwork fold.
PER_ARTWORK = 0.0


@router.get(
    "/search",
    response_model=SearchPage,
    summary="Image fragments that show a phrase",
    description=(
        "The query is split into the noun phrases it names (\"blue fish on a red cup\" -> "
        "\"blue fish\", \"red cup\"; `phrases` in the answer); a query that names none is "
        "searched whole. Two stages: FAISS proposes, for each phrase, the K fragments whose "
        "pooled vectors are nearest to the phrase's, stacked cross attention scores every "
        "proposed fragment against every phrase, and a fragment's score is the mean of its "
        "best phrase score and its mean phrase score: the named thing it shows best counts "
        "most, and among fragments showing one thing those that also show the others rank "
        "first (one phrase: its score). Each hit "
        "carries, for every phrase word, the fragment's regions it attended to. "
        "`unknown_words` lists the query words the model cannot use (outside a vocabulary "
        "model's words; none for the pretrained MiniLM text encoder). A page past the first K "
        "hits fetches and reranks K more candidates at a time, so every page of one block of "
        "K comes from the same candidates. One result per thing: fragments of one artwork "
        "whose boxes overlap (IoU >= the service's fold_iou, 0.7 by default) fold into the "
        "best-scoring one, which lists them in `also`; a block is folded as a whole before it "
        "is paged, and grows by K while it folds to fewer hits than the page needs. Filters "
        "(`filter`, `title`, `source`, `classification`) restrict the FAISS search to the "
        "artworks they keep. `per_artwork=true` gives one hit per artwork: every fragment of "
        "an artwork folds into its best-scoring one, overlapping or not."
    ),
    responses={
        422: {"description": "empty, wordless or over-long query"},
        503: {"description": "busy (Retry-After) or the database is unavailable"},
    },
)
async def search(
    runtime: RuntimeDep,
    session: SessionDep,
    filters: FilterDep,
    q: Annotated[str, Query(min_length=1, description="a phrase, e.g. 'two gold birds'",
                            examples=["two gold birds"])],
    limit: Annotated[int, Query(ge=1, le=100, description="hits per page")] = 10,
    offset: Annotated[int, Query(ge=0, le=10_000, description="hits to skip")] = 0,
    per_artwork: Annotated[bool, Query(description=(
        "one hit per artwork: the artwork's other matching fragments are listed in the "
        "hit's `also` instead of taking places of their own"))] = False,
) -> SearchPage:
    settings = runtime.settings
    if len(q) > settings.limits.max_query_chars:
        raise Problem(422, "query-too-long", "Query too long",
                      f"q has {len(q)} characters; the limit is {settings.limits.max_query_chars}")
    # Whole blocks of K: the pages within one block rank the same candidates.
    block = runtime.candidates("fragments")
    candidates = -(-(offset + limit) // block) * block
    timings: dict[str, float] = {}
    parsed, hits = await runtime.pool.run(
        _search, runtime.engine, session, q, k=candidates, limit=limit, offset=offset,
        filters=filters or None, fold_iou=PER_ARTWORK if per_artwork else settings.retrieval.fold_iou,
        timings=timings,
    )
    runtime.metrics.observe_stages(timings)
    return SearchPage(query=q, phrases=parsed.phrases, whole_query=parsed.whole,
                      unknown_words=parsed.unknown_words,
                      items=[_hit(runtime, hit) for hit in hits], limit=limit, offset=offset)


def _search(engine: Engine, session: Session, q: str, **options: Any
            ) -> tuple[ParsedQuery, list[FragmentHit]]:
    """The query's phrases and its hits, in one trip to the inference pool."""
    parsed = engine.parse_query(q)
    return parsed, engine.search_text(session, parsed, **options)


def _hit(runtime: Runtime, hit: FragmentHit) -> SearchHit:
    return SearchHit(
        fragment_id=hit.fragment_id, artwork_id=hit.artwork_id, external_id=hit.external_id,
        title=hit.title, box=list(hit.box), score=hit.score,
        crop_url=runtime.url(f"/fragments/{hit.fragment_id}/image"),
        image_url=runtime.url(f"/artworks/{hit.artwork_id}/image"),
        thumbnail_url=runtime.url(f"/artworks/{hit.artwork_id}/thumbnail"),
        width=hit.width, height=hit.height, attention=hit.attention, also=hit.also,
        attributes=hit.attributes,
    )
