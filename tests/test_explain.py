"""The statements of the search and upload paths read big tables through indexes (PostgreSQL).

A scratch database holding 150k fragments (bench/fill.py: bulk rows, a feature store, saved
indexes; then ANALYZE) is served in-process with the tiny checkpoints, and every statement
the service sends for GET /search, POST /annotate, an artwork's detail, an upload, a replace
and a delete is EXPLAINed with its parameters (bench/explain.py). `artalign bench explain`
does the same at 1M fragments with the demo model (docs/SCALING.md has its table).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import TinyCheckpoints, image_bytes, migrated_pg_database

pytestmark = pytest.mark.postgres

FRAGMENTS = 150_000
BIG_ROWS = 2_000  # here every table the fill writes is bigger: artworks, phrases, ...
REQUESTS = {"GET /search", "POST /annotate", "GET /artworks/{id}", "POST /artworks",
            "PUT /artworks/external/{id}", "DELETE /artworks/external/{id}"}


def test_hot_statements_read_big_tables_through_an_index(
        tiny_checkpoints: TinyCheckpoints, tmp_path: Path, _pg_template: str) -> None:
    from app.db.session import create_db_engine
    from bench.explain import explain_all, record_paths
    from bench.fill import fill

    with migrated_pg_database("artalign_explain", template=_pg_template) as url:
        database = create_db_engine(url)
        try:
            filled = fill(database, tmp_path, fragments=FRAGMENTS, scan=tiny_checkpoints.scan,
                          detector=tiny_checkpoints.detector, memory_budget=1 << 30)
        finally:
            database.dispose()
        recorded = record_paths(url, tmp_path, scan=tiny_checkpoints.scan,
                                detector=tiny_checkpoints.detector, memory_budget=1 << 30,
                                artwork_id=filled.artworks // 2 + 1, image=image_bytes(3, (96, 72)),
                                caption="A red cat among blue clouds.")
        explained = explain_all(url, recorded, big_rows=BIG_ROWS)

    assert {request for e in explained for request in e.requests} == REQUESTS
    hot = [e for e in explained if not e.whole_table]
    misses = [(e.requests, e.statement, e.big_seq_scans) for e in hot if e.big_seq_scans]
    assert not misses, misses
    reads = [e for e in hot if e.big_tables]
    assert all(e.uses_index for e in reads), [(e.statement, e.root) for e in reads if not e.uses_index]
    # The statements that matter most, by name: search's candidates and their boxes,
    # the upload's lookup by external id, the detail's fragments.
    for request, table in (("GET /search", "fragments"), ("GET /search", "regions"),
                           ("POST /artworks", "artworks"), ("GET /artworks/{id}", "fragments"),
                           ("DELETE /artworks/external/{id}", "artwork_phrases")):
        assert any(request in e.requests and table in e.tables and e.uses_index for e in hot), \
            (request, table)
