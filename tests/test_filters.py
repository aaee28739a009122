"""Filters and facet counts on stored metadata, in SQL, on PostgreSQL and SQLite alike."""

from __future__ import annotations

from sqlalchemy import select

from app.db.models import Artwork
from app.services.catalog import list_artworks
from app.services.filters import ArtworkFilter, count_artworks, facet_counts

ROWS = [  # external id, title, metadata
    ("a-1", "Blue vase with birds", {"source": "synth", "classification": "vase", "date": 1850}),
    ("a-2", "Red VASE", {"source": "synth", "classification": "vase", "date": "1850"}),
    ("a-3", "Gold box", {"source": "museum", "classification": "box", "date": 1900}),
    ("a-4", "Box 100%_sure", {"source": "museum", "classification": "box"}),
    ("a-5", "Statue", {"source": "museum", "classification": "statue", "date": ""}),
]


def add_rows(session) -> None:
    for external_id, title, meta in ROWS:
        session.add(Artwork(external_id=external_id, title=title, meta=meta,
                            image_location="x.png", image_sha256="0" * 64,
                            content_sha256="1" * 64, width=8, height=8))
    session.commit()


def kept(session, artwork_filter: ArtworkFilter) -> list[str]:
    query = artwork_filter.apply(select(Artwork.external_id)).order_by(Artwork.id)
    return list(session.scalars(query))


def test_filters_keep_the_same_artworks_on_both_databases(db_session) -> None:
    add_rows(db_session)
    assert kept(db_session, ArtworkFilter()) == [r[0] for r in ROWS]
    assert kept(db_session, ArtworkFilter({"classification": ("box",)})) == ["a-3", "a-4"]
    # Values of one field are alternatives; fields all apply.
    assert kept(db_session, ArtworkFilter({"classification": ("box", "statue")},)) == ["a-3", "a-4", "a-5"]
    assert kept(db_session, ArtworkFilter({"classification": ("box", "vase"), "source": ("synth",)})) == ["a-1", "a-2"]
    # A number compares as its text; an absent field holds no value.
    assert kept(db_session, ArtworkFilter({"date": ("1850",)})) == ["a-1", "a-2"]
    assert kept(db_session, ArtworkFilter({"nowhere": ("x",)})) == []
    # Title: a case-insensitive substring, with % and _ taken literally.
    assert kept(db_session, ArtworkFilter(title="vase")) == ["a-1", "a-2"]
    assert kept(db_session, ArtworkFilter(title="0%_s")) == ["a-4"]
    assert kept(db_session, ArtworkFilter(title="%")) == ["a-4"]
    assert kept(db_session, ArtworkFilter({"source": ("museum",)}, title="box")) == ["a-3", "a-4"]
    assert kept(db_session, ArtworkFilter(text="A-3")) == ["a-3"]  # title or external id
    assert kept(db_session, ArtworkFilter(text="gold")) == ["a-3"]
    page, total = list_artworks(db_session, filters=ArtworkFilter({"source": ("museum",)}, text="a-"),
                                limit=2, offset=0)
    assert [a.external_id for a in page] == ["a-3", "a-4"] and total == 3


def test_facet_counts_in_sql(db_session) -> None:
    add_rows(db_session)
    everything = facet_counts(db_session, ArtworkFilter(), ["classification", "date", "nowhere"])
    # Most frequent first, ties by value; empty values and absent fields are not counted.
    assert everything == {"classification": [("box", 2), ("vase", 2), ("statue", 1)],
                          "date": [("1850", 2), ("1900", 1)], "nowhere": []}
    museum = ArtworkFilter({"source": ("museum",), "classification": ("box",)})
    counts = facet_counts(db_session, museum, ["classification", "source"])
    # A field counts under the other fields' conditions: its other values stay choosable.
    assert counts["classification"] == [("box", 2), ("statue", 1)]
    assert counts["source"] == [("museum", 2)]
    assert count_artworks(db_session, museum) == 2
    assert facet_counts(db_session, ArtworkFilter(title="vase"), ["source"]) == {"source": [("synth", 2)]}
    assert facet_counts(db_session, ArtworkFilter(), ["classification"], limit=1) == {"classification": [("box", 2)]}
