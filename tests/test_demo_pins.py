"""The committed demo model's /search answers, pinned: a refactor must not change them.

A small demo collection is prepared the way `artalign demo` does (synthesis, extraction with
demo/detector.pt, ingestion, index build with demo/scan.pt, SQLite), served in-process, and
asked 20 fixed queries. Ids, boxes and scores (to 1e-3) must equal tests/fixtures/demo_pins.json.

When the demo model changes on purpose, regenerate the pins and commit the new file:

    ARTALIGN_UPDATE_PINS=1 python -m pytest tests/test_demo_pins.py
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

DEMO_MODELS = Path(__file__).resolve().parents[1] / "demo"
PINS = Path(__file__).resolve().parent / "fixtures" / "demo_pins.json"
DEMO_N, DEMO_SEED = 40, 7  # `artalign demo` uses n 200; 40 artworks still give ~300 fragments
SCORE_TOLERANCE = 1e-3
# (q, extra parameters): plain phrases, multi-word and sentence-like queries, a filter, a page.
QUERIES = [
    ("gold dragon", {}), ("white spiral", {}), ("black scarab", {}), ("white butterfly", {}),
    ("pink inscription band", {}), ("two blue spirals", {}), ("limestone stela", {}),
    ("wood bottle", {}), ("turquoise lotus", {}), ("gold fish", {}), ("two gold dragons", {}),
    ("bronze bowl", {}), ("red star", {}), ("purple wave", {}), ("two white flowers", {}),
    ("surface", {}), ("A blue vase with two gold birds among clouds.", {}),
    ("unicorn", {}), ("white cloud", {"classification": "box"}), ("pink bird", {"offset": 5}),
]


@pytest.fixture(scope="module")
def demo_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    from app.cli.serve import prepare_demo
    from app.main import create_app
    from app.settings import Settings

    detector, scan = DEMO_MODELS / "detector.pt", DEMO_MODELS / "scan.pt"
    if not (detector.is_file() and scan.is_file()):
        pytest.skip(f"the trained demo model is not in {DEMO_MODELS}")
    root = tmp_path_factory.mktemp("demo")
    database_url = f"sqlite:///{root / 'artalign.db'}"
    prepare_demo(collection=root / "collection", database_url=database_url, data_dir=root,
                 detector=detector, scan=scan, n=DEMO_N, seed=DEMO_SEED, device="cpu")
    settings = Settings(database_url=database_url, data_dir=root, scan_checkpoint=scan,
                        detector_checkpoint=detector, device="cpu")
    with TestClient(create_app(settings)) as client:
        yield client


def answers(client: TestClient) -> list[dict]:
    """Per query: the hits' external ids, boxes (0.1 px) and scores (1e-4)."""
    pinned = []
    for q, extra in QUERIES:
        response = client.get("/search", params={"q": q, "limit": 5, **extra})
        assert response.status_code == 200, response.text
        pinned.append({"q": q, **extra, "hits": [
            {"external_id": hit["external_id"], "box": [round(v, 1) for v in hit["box"]],
             "score": round(hit["score"], 4)}
            for hit in response.json()["items"]]})
    return pinned


def test_demo_search_answers_are_pinned(demo_client: TestClient) -> None:
    found = answers(demo_client)
    if os.environ.get("ARTALIGN_UPDATE_PINS"):
        PINS.parent.mkdir(exist_ok=True)
        lines = ",\n".join(json.dumps(query) for query in found)  # one query a line
        PINS.write_text(f"[\n{lines}\n]\n", encoding="utf-8")
        pytest.skip(f"wrote {PINS}: review and commit it")
    pinned = json.loads(PINS.read_text(encoding="utf-8"))
    assert [p["q"] for p in found] == [p["q"] for p in pinned]
    assert sum(len(p["hits"]) for p in pinned) >= 60, "the pins should hold real answers"
    for got, want in zip(found, pinned, strict=True):
        where = f"query {got['q']!r}"
        assert [(h["external_id"], h["box"]) for h in got["hits"]] == \
               [(h["external_id"], h["box"]) for h in want["hits"]], where
        for hit, expected in zip(got["hits"], want["hits"], strict=True):
            assert abs(hit["score"] - expected["score"]) <= SCORE_TOLERANCE, (where, hit, expected)
