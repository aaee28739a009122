"""GET /facets: per metadata field, how many artworks hold each value under a filter."""

from __future__ import annotations

from dataclasses import replace
from typing import Annotated

from fastapi import APIRouter, Query

from app.api.deps import FilterDep, RuntimeDep, SessionDep, check_field_name
from app.api.errors import Problem
from app.api.schemas import Facets, FacetValue
from app.services.filters import count_artworks, facet_counts

router = APIRouter(tags=["artworks"])

MAX_FACET_FIELDS = 20


@router.get(
    "/facets", response_model=Facets, summary="Counts of metadata values under a filter",
    description="Takes the filter of GET /artworks and GET /search. Counted in the database; "
                "each field counts its values under the other fields' conditions, so choosing "
                "a second value of one field (an alternative) keeps its count meaningful.",
)
def facets(
    runtime: RuntimeDep, session: SessionDep, filters: FilterDep,
    q: Annotated[str | None, Query(max_length=200, description="text in the title or external "
                                   "id, as in GET /artworks")] = None,
    field: Annotated[list[str] | None, Query(
        description="metadata fields to count (repeat it); default the service's facet_fields",
        examples=["classification"])] = None,
) -> Facets:
    names = field or runtime.settings.retrieval.facet_fields
    if len(names) > MAX_FACET_FIELDS:
        raise Problem(422, "invalid-filter", "Invalid filter",
                      f"{len(names)} facet fields; at most {MAX_FACET_FIELDS}")
    names = [check_field_name(name, "field") for name in dict.fromkeys(names)]
    filters = replace(filters, text=q)
    counts = facet_counts(session, filters, names)
    return Facets(total=count_artworks(session, filters),
                  fields={name: [FacetValue(value=v, count=c) for v, c in values]
                          for name, values in counts.items()})
