"""The HTTP API end to end: real PostgreSQL, real checkpoints, real images, through HTTP.

With the tiny random checkpoints (tests/conftest.py) scores mean nothing, so these tests check
what the service does with them: ingest → search → replace → delete, every response shape,
the curator's annotations, readiness and metrics. With the trained demo model (demo/*.pt)
present, the last tests check that the answers are right: a crop of a synthetic artwork is
annotated with its ground-truth phrase, and a phrase finds the fragment it names.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from tests.conftest import TinyCheckpoints, image_bytes, migrated_pg_database

pytestmark = pytest.mark.postgres

KEY = "test-writer-key-0123"
WRITE = {"X-API-Key": KEY}
PROBLEM_JSON = "application/problem+json"
DEMO_MODELS = Path(__file__).resolve().parents[1] / "demo"


# -- shared by the API test files ----------------------------------------------------------


def pg_database() -> AbstractContextManager[str]:
    """A fresh migrated PostgreSQL database, dropped afterwards. One per test module: an app
    start per test would cost seconds. Skips when the server is not reachable."""
    return migrated_pg_database("artalign_api")


@pytest.fixture(scope="module")
def pg_module_url() -> Iterator[str]:
    with pg_database() as url:
        yield url


def make_settings(database_url: str, data_dir: Path, scan: Path, detector: Path, **overrides):  # noqa: ANN201
    from app.settings import Settings

    return Settings(database_url=database_url, data_dir=data_dir, scan_checkpoint=scan,
                    detector_checkpoint=detector, api_keys=[KEY], **overrides)


def start(settings) -> TestClient:  # noqa: ANN001
    """A client whose app has run its lifespan (model and indexes loaded)."""
    from app.main import create_app

    client = TestClient(create_app(settings), raise_server_exceptions=False)
    client.__enter__()
    return client


def artwork_form(external_id: str, *, seed: int = 1, captions: list[str] | None = None,
                 annotations: list[dict] | None = None, **fields) -> dict:
    document = {
        "external_id": external_id, "title": f"Artwork {external_id}",
        "metadata": {"source": "tests", "classification": "vase"},
        "captions": captions if captions is not None else ["A blue vase with two gold birds."],
        "annotations": annotations or [], **fields,
    }
    return {"files": {"image": (f"{external_id}.png", image_bytes(seed), "image/png")},
            "data": {"artwork": json.dumps(document)}}


def assert_problem(response, status: int, *words: str) -> dict:  # noqa: ANN001
    """The response is an RFC 9457 problem with ``status`` whose detail names ``words``."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM_JSON)
    body = response.json()
    assert body["status"] == status
    assert body["type"].startswith("urn:artalign:problem:")
    assert body["title"] and body["instance"]
    for word in words:
        assert word in body["detail"], (word, body["detail"])
    return body


@pytest.fixture(scope="module")
def client(pg_module_url: str, tiny_checkpoints: TinyCheckpoints,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    settings = make_settings(pg_module_url, tmp_path_factory.mktemp("data"),
                             tiny_checkpoints.scan, tiny_checkpoints.detector)
    client = start(settings)
    yield client
    client.__exit__(None, None, None)


# -- the tests -----------------------------------------------------------------------------


def test_ingest_search_replace_delete(client: TestClient) -> None:
    created = client.post("/artworks", headers=WRITE, **artwork_form(
        "vase-1", annotations=[{"phrase": "Two gold birds", "box": [4, 4, 30, 30]}]))
    assert created.status_code == 201, created.text
    report = created.json()
    assert report["status"] == "created" and report["fragments"] >= 2
    artwork_id = report["id"]
    assert report["url"] == f"/artworks/{artwork_id}"

    again = client.post("/artworks", headers=WRITE, **artwork_form(
        "vase-1", annotations=[{"phrase": "Two gold birds", "box": [4, 4, 30, 30]}]))
    assert again.status_code == 200 and again.json()["status"] == "unchanged"

    detail = client.get(f"/artworks/{artwork_id}").json()
    assert detail["external_id"] == "vase-1"
    assert detail["captions"] == ["A blue vase with two gold birds."]
    assert "two gold birds" in detail["phrases"]
    sources = {f["source"] for f in detail["fragments"]}
    assert {"whole", "annotation"} <= sources
    assert (detail["width"], detail["height"]) == (64, 48)

    hits = client.get("/search", params={"q": "two gold birds", "limit": 50}).json()["items"]
    fragment_ids = {f["id"] for f in detail["fragments"]}
    assert hits and {hit["fragment_id"] for hit in hits} <= fragment_ids
    hit = hits[0]
    assert hit["artwork_id"] == artwork_id and hit["external_id"] == "vase-1"
    assert [w["word"] for w in hit["attention"]] == ["two", "gold", "birds"]
    for word in hit["attention"]:
        assert sum(r["weight"] for r in word["regions"]) == pytest.approx(1.0, abs=1e-4)
    crop = client.get(hit["crop_url"])
    assert crop.status_code == 200 and crop.headers["content-type"] == "image/jpeg"
    assert client.get(hit["image_url"]).content == image_bytes(1)
    thumbnail = client.get(hit["thumbnail_url"])
    assert thumbnail.status_code == 200 and thumbnail.headers["content-type"] == "image/jpeg"
    assert hits == sorted(hits, key=lambda h: -h["score"])

    # A query naming two things: each phrase scored, the words the GRU cannot read named.
    answer = client.get("/search", params={"q": "two gold birds beside a zebra"}).json()
    assert answer["phrases"] == ["two gold birds", "zebra"] and not answer["whole_query"]
    assert answer["unknown_words"] == ["beside", "zebra"]
    assert [w["word"] for w in answer["items"][0]["attention"]] == ["two", "gold", "birds", "zebra"]
    answer = client.get("/search", params={"q": "very old"}).json()  # no noun phrase: searched whole
    assert answer["whole_query"] and answer["phrases"] == ["very old"] and answer["items"]

    # Replace: a new image and caption. The artwork keeps its id, its fragments are new.
    replaced = client.put("/artworks/external/vase-1", headers=WRITE, **artwork_form(
        "vase-1", seed=2, captions=["A red dragon among clouds."]))
    assert replaced.status_code == 200 and replaced.json()["status"] == "replaced"
    assert replaced.json()["id"] == artwork_id
    detail = client.get(f"/artworks/{artwork_id}").json()
    assert "two gold birds" not in detail["phrases"] and "red dragon" in detail["phrases"]
    new_fragments = {f["id"] for f in detail["fragments"]}
    assert not new_fragments & fragment_ids
    hits = client.get("/search", params={"q": "red dragon", "limit": 50}).json()["items"]
    assert {h["fragment_id"] for h in hits if h["artwork_id"] == artwork_id} <= new_fragments
    assert not {h["fragment_id"] for h in hits} & fragment_ids

    deleted = client.delete("/artworks/external/vase-1", headers=WRITE)
    assert deleted.status_code == 200 and deleted.json() == {"external_id": "vase-1", "deleted": True}
    hits = client.get("/search", params={"q": "red dragon", "limit": 50}).json()["items"]
    assert all(h["artwork_id"] != artwork_id for h in hits)
    assert_problem(client.get(f"/artworks/{artwork_id}"), 404, str(artwork_id))


def test_list_filter_and_page_artworks(client: TestClient) -> None:
    for n, classification in ((1, "bowl"), (2, "bowl"), (3, "plate")):
        form = artwork_form(f"list-{n}", seed=10 + n, metadata={"source": "list-test",
                                                                 "classification": classification})
        assert client.post("/artworks", headers=WRITE, **form).status_code == 201
    page = client.get("/artworks", params={"q": "list-", "limit": 2}).json()
    assert page["total"] == 3 and page["limit"] == 2 and len(page["items"]) == 2
    rest = client.get("/artworks", params={"q": "list-", "limit": 2, "offset": 2}).json()
    assert [i["external_id"] for i in page["items"] + rest["items"]] == ["list-1", "list-2", "list-3"]
    bowls = client.get("/artworks", params={"source": "list-test", "classification": "bowl"}).json()
    assert [i["external_id"] for i in bowls["items"]] == ["list-1", "list-2"]
    item = bowls["items"][0]
    assert set(item) == {"id", "external_id", "title", "metadata", "width", "height",
                         "image_url", "thumbnail_url"}
    thumbnail = client.get(item["thumbnail_url"])
    assert thumbnail.status_code == 200 and thumbnail.headers["content-type"] == "image/jpeg"
    from PIL import Image

    assert max(Image.open(io.BytesIO(thumbnail.content)).size) <= 256
    by_external = client.get("/artworks/external/list-3").json()
    assert by_external["id"] == client.get("/artworks", params={"q": "list-3"}).json()["items"][0]["id"]

    # Search filtered to one classification only returns fragments of those artworks.
    plate_ids = {i["id"] for i in client.get("/artworks", params={"classification": "plate"}).json()["items"]}
    hits = client.get("/search", params={"q": "blue vase", "classification": "plate", "limit": 50}).json()
    assert hits["items"] and {h["artwork_id"] for h in hits["items"]} <= plate_ids


def test_filters_and_facets(client: TestClient) -> None:
    for n, (classification, period) in enumerate((("cup", "Ming"), ("cup", "Qing"), ("jar", "Ming"))):
        form = artwork_form(f"facet-{n}", seed=80 + n, title=f"Facet {classification} {n}",
                            metadata={"source": "facet-test", "classification": classification,
                                      "period": period})
        assert client.post("/artworks", headers=WRITE, **form).status_code == 201

    def listed(**params) -> list[str]:
        response = client.get("/artworks", params={"source": "facet-test", **params})
        assert response.status_code == 200, response.text
        return [i["external_id"] for i in response.json()["items"]]

    assert listed(filter="period:Ming") == ["facet-0", "facet-2"]
    assert listed(filter=["period:Ming", "classification:cup"]) == ["facet-0"]
    assert listed(filter=["classification:cup", "classification:jar"]) == ["facet-0", "facet-1", "facet-2"]
    assert listed(title="JAR") == ["facet-2"]
    assert listed(filter="period:Tang") == []
    for bad in ("period", "pe\"riod:x", ":x"):
        assert_problem(client.get("/artworks", params={"filter": bad}), 422, "filter")
    assert_problem(client.get("/facets", params={"field": "a'b"}), 422, "field")

    # Search restricts FAISS to the filtered artworks' fragments, not a short list.
    ids = {client.get("/artworks", params={"q": f"facet-{n}"}).json()["items"][0]["id"] for n in (0, 2)}
    found = client.get("/search", params={"q": "gold birds", "filter": "period:Ming", "limit": 100}).json()
    assert found["items"] and {h["artwork_id"] for h in found["items"]} == ids

    facets = client.get("/facets", params={"source": "facet-test", "filter": "period:Ming",
                                           "field": ["classification", "period"]}).json()
    assert facets == {"total": 2, "fields": {
        "classification": [{"value": "cup", "count": 1}, {"value": "jar", "count": 1}],
        "period": [{"value": "Ming", "count": 2}, {"value": "Qing", "count": 1}]}}
    default = client.get("/facets", params={"source": "facet-test"}).json()["fields"]
    assert list(default) == ["classification", "period", "date", "source"]
    # source counts its values under the other conditions (none): the other tests' sources too
    assert {"value": "facet-test", "count": 3} in default["source"] and default["date"] == []


def test_one_result_per_thing_with_the_detectors_words(client: TestClient) -> None:
    from index.fragments import iou

    near = [{"phrase": "gold birds", "box": [4, 4, 30, 30]}, {"phrase": "two birds", "box": [5, 5, 30, 30]}]
    artwork_id = client.post("/artworks", headers=WRITE, **artwork_form(
        "fold-1", seed=90, annotations=near)).json()["id"]
    detail = client.get(f"/artworks/{artwork_id}").json()
    annotated = [f for f in detail["fragments"] if f["source"] == "annotation"]
    # Two annotations IoU 0.92 apart, both certain: the lower id stands for the other.
    assert len(annotated) == 1 and len(annotated[0]["also"]) >= 1
    shown = [f["id"] for f in detail["fragments"]]
    folded = [i for f in detail["fragments"] for i in f["also"]]
    with client.app.state.runtime.sessions() as session:
        from sqlalchemy import select

        from app.db.models import Fragment

        stored = set(session.scalars(select(Fragment.id).where(Fragment.artwork_id == artwork_id)))
    assert sorted(shown + folded) == sorted(stored) and annotated[0]["id"] < min(annotated[0]["also"])
    boxes = np.array([f["box"] for f in detail["fragments"]])
    overlaps = iou(boxes, boxes)
    assert (overlaps[~np.eye(len(boxes), dtype=bool)] < 0.7).all()
    for fragment in detail["fragments"]:
        words = fragment["attributes"]
        assert len(words) == 3 and {w["word"] for w in words} <= {"gold", "bird", "red", "blue"}
        assert [w["score"] for w in words] == sorted((w["score"] for w in words), reverse=True)

    hits = client.get("/search", params={"q": "gold birds", "limit": 100, "filter": "source:tests"}).json()["items"]
    mine = [h for h in hits if h["artwork_id"] == artwork_id]
    assert mine and sum(1 + len(h["also"]) for h in mine) == len(stored)
    boxes = np.array([h["box"] for h in mine])
    assert (iou(boxes, boxes)[~np.eye(len(boxes), dtype=bool)] < 0.7).all()
    assert all(len(h["attributes"]) == 3 for h in hits)



def test_attribute_words_can_be_turned_off(client: TestClient) -> None:
    """retrieval.attribute_words = false: a detector trained on other things (the real demo's
    learnt icon labels) names nothing, on search hits and on an artwork's fragments."""
    settings = client.app.state.settings.model_copy(deep=True)
    settings.retrieval.attribute_words = False
    quiet = start(settings)
    try:
        artwork_id = quiet.post("/artworks", headers=WRITE, **artwork_form(
            "quiet-1", seed=91, captions=["A gold bird on a red plate."])).json()["id"]
        fragments = quiet.get(f"/artworks/{artwork_id}").json()["fragments"]
        hits = quiet.get("/search", params={"q": "gold bird", "limit": 20}).json()["items"]
        assert fragments and hits
        assert all(f["attributes"] == [] for f in fragments)
        assert all(h["attributes"] == [] for h in hits)
        assert all(h["attributes"] for h in client.get("/search", params={"q": "gold bird"}).json()["items"])
    finally:
        quiet.__exit__(None, None, None)


def test_annotate_an_upload_and_a_box(client: TestClient) -> None:
    report = client.post("/artworks", headers=WRITE, **artwork_form(
        "annotate-1", seed=21, captions=["A green lotus on a stone statue."])).json()
    upload = client.post("/annotate", params={"limit": 3},
                         files={"image": ("crop.jpg", image_bytes(22, fmt="JPEG"), "image/jpeg")})
    assert upload.status_code == 200, upload.text
    items = upload.json()["items"]
    assert 1 <= len(items) <= 3
    assert items == sorted(items, key=lambda i: -i["score"])
    for item in items:
        assert set(item) == {"phrase_id", "phrase", "score", "artworks"}
        assert item["artworks"] and {"id", "external_id", "title"} == set(item["artworks"][0])

    by_box = client.post("/annotate", json={"artwork_id": report["id"], "box": [0, 0, 40, 30]})
    assert by_box.status_code == 200, by_box.text
    scores = [i["score"] for i in by_box.json()["items"]]
    threshold = float(np.median(scores))
    kept = client.post("/annotate", params={"min_score": threshold},
                       json={"artwork_id": report["id"], "box": [0, 0, 40, 30]}).json()["items"]
    assert [i["score"] for i in kept] == [s for s in scores if s >= threshold]


def test_uploads_detect_regions_outside_the_write_lock(client: TestClient) -> None:
    """The detector pass is the slow part of an upload; holding the write lock through it
    would serialise every upload. It runs before the lock; its boxes still reach the index."""
    runtime = client.app.state.runtime
    extractor = runtime.engine.extractor
    held = []
    real_extract = extractor.extract

    def watching(images, **kwargs):  # noqa: ANN001, ANN003, ANN202
        held.append(runtime.write_lock.locked())
        return real_extract(images, **kwargs)

    extractor.extract = watching
    try:
        box = [4.0, 6.0, 40.0, 30.0]
        report = client.post("/artworks", headers=WRITE, **artwork_form(
            "unlocked-1", seed=41, annotations=[{"phrase": "gold bird", "box": box}]))
    finally:
        del extractor.extract  # back to the class's method
    assert report.status_code == 201, report.text
    assert held == [False]  # one detector pass, with the annotation box pooled in it, unlocked
    detail = client.get(f"/artworks/{report.json()['id']}").json()
    annotated = [f["box"] for f in detail["fragments"] if f["source"] == "annotation"]
    assert len(annotated) == 1 and np.allclose(annotated[0], box, atol=0.01)
    assert "gold bird" in detail["phrases"]


def test_batch_reports_each_item(client: TestClient) -> None:
    def item(external_id: str, seed: int) -> dict:
        return {"external_id": external_id, "title": external_id, "captions": ["A red cat head."],
                "image_base64": base64.b64encode(image_bytes(seed)).decode()}

    good, bad_image = item("batch-1", 31), item("batch-2", 32)
    bad_image["image_base64"] = base64.b64encode(b"not an image").decode()
    missing_id = {k: v for k, v in item("batch-3", 33).items() if k != "external_id"}
    response = client.post("/artworks/batch", headers=WRITE, json=[good, bad_image, missing_id])
    assert response.status_code == 200, response.text
    report = response.json()
    assert [i["status"] for i in report["items"]] == ["created", "failed", "failed"]
    assert "batch-2" in report["items"][1]["error"] and "not an image" in report["items"][1]["error"]
    assert "external_id" in report["items"][2]["error"]
    assert report["counts"] == {"created": 1, "failed": 2}

    lines = "\n".join(json.dumps(x) for x in (good, item("batch-4", 34))) + "\n"
    response = client.post("/artworks/batch", headers={**WRITE, "Content-Type": "application/x-ndjson"},
                           content=lines.encode())
    assert [i["status"] for i in response.json()["items"]] == ["unchanged", "created"]


def test_curator_annotation_becomes_a_w3c_annotation_and_a_phrase(client: TestClient) -> None:
    artwork_id = client.post("/artworks", headers=WRITE, **artwork_form("curated-1", seed=41)).json()["id"]
    fragments = client.app.state.runtime.engine.indexes["fragments"]
    count = len(fragments)
    stored = client.post("/annotations", headers=WRITE,
                         json={"artwork_id": artwork_id, "box": [10, 8, 42, 40], "phrase": "The painted box"})
    assert stored.status_code == 201, stored.text
    assert stored.json()["phrase"] == "painted box" and stored.json()["source"] == "curator"
    assert "painted box" in client.get(f"/artworks/{artwork_id}").json()["phrases"]
    # The new phrase is in the phrase index at once: annotating can now propose it.
    proposed = client.post("/annotate", params={"limit": 100},
                           json={"artwork_id": artwork_id, "box": [10, 8, 42, 40]}).json()["items"]
    assert "painted box" in {i["phrase"] for i in proposed}
    # The box became an annotation fragment, in the fragment index at once; a second phrase
    # for the same box reuses it.
    assert len(fragments) == count + 1
    boxes = [f["box"] for f in client.get(f"/artworks/{artwork_id}").json()["fragments"]
             if f["source"] == "annotation"]
    assert len(boxes) == 1 and np.allclose(boxes[0], [10, 8, 42, 40], atol=0.01)
    again = client.post("/annotations", headers=WRITE,
                        json={"artwork_id": artwork_id, "box": [10, 8, 42, 40], "phrase": "lid"})
    assert again.status_code == 201, again.text
    assert len(fragments) == count + 1
    assert sum(f["source"] == "annotation" for f in client.get(f"/artworks/{artwork_id}").json()["fragments"]) == 1

    page = client.get(f"/artworks/{artwork_id}/annotations", params={"suggestions": 2})
    assert page.status_code == 200
    body = page.json()
    assert body["@context"] == "http://www.w3.org/ns/anno.jsonld" and body["type"] == "AnnotationPage"
    described = [a for a in body["items"] if a["motivation"] == "describing"]
    assert [a["body"]["value"] for a in described] == ["painted box", "lid"]
    assert described[0]["target"]["selector"] == {
        "type": "FragmentSelector", "conformsTo": "http://www.w3.org/TR/media-frags/",
        "value": "xywh=10,8,32,32"}
    assert described[0]["target"]["source"] == f"/artworks/{artwork_id}/image"
    suggested = [a for a in body["items"] if a["motivation"] == "tagging"]
    assert len(suggested) <= 2 and all(isinstance(a["score"], float) for a in suggested)


def test_a_replica_picks_up_what_another_instance_ingested(
        tiny_checkpoints: TinyCheckpoints, tmp_path: Path) -> None:
    """Two instances over one database and one data folder: the reader's in-memory indexes
    catch up with the writer's uploads by themselves (index_sync_seconds), no restart."""
    import time

    with pg_database() as url:
        data = tmp_path / "shared"
        writer = start(make_settings(url, data, tiny_checkpoints.scan, tiny_checkpoints.detector,
                                     index_sync_seconds=0))
        reader = start(make_settings(url, data, tiny_checkpoints.scan, tiny_checkpoints.detector,
                                     index_sync_seconds=0.1))
        try:
            engines = [c.app.state.runtime.engine.indexes for c in (writer, reader)]
            assert [e.fragment_count() for e in engines] == [0, 0]
            for number in range(2):
                report = writer.post("/artworks", headers=WRITE, **artwork_form(f"replica-{number}",
                                                                                seed=60 + number))
                assert report.status_code == 201, report.text
            want = engines[0].fragment_count(), engines[0].phrase_count()
            assert want[0] > 0
            deadline = time.monotonic() + 20
            while (engines[1].fragment_count(), engines[1].phrase_count()) != want:
                assert time.monotonic() < deadline, "the reader never caught up"
                time.sleep(0.05)
            # The reader's feature store sees the writer's rows too: it can rerank them.
            found = reader.get("/search", params={"q": "gold birds", "limit": 50}).json()["items"]
            assert {hit["external_id"] for hit in found} == {"replica-0", "replica-1"}
        finally:
            for client in (writer, reader):
                client.__exit__(None, None, None)


def test_search_pages_past_k_rank_another_block_of_candidates(
        tiny_checkpoints: TinyCheckpoints, tmp_path: Path) -> None:
    with pg_database() as url:
        client = start(make_settings(url, tmp_path / "data", tiny_checkpoints.scan,
                                     tiny_checkpoints.detector, retrieval={"candidates": 3}))
        try:
            for number in range(2):
                assert client.post("/artworks", headers=WRITE, **artwork_form(
                    f"pages-{number}", seed=70 + number)).status_code == 201
            assert client.app.state.runtime.engine.indexes.fragment_count() >= 6

            def page(offset: int, limit: int) -> list[int]:
                response = client.get("/search", params={"q": "gold birds", "offset": offset, "limit": limit})
                assert response.status_code == 200, response.text
                return [hit["fragment_id"] for hit in response.json()["items"]]

            beyond = page(3, 3)  # past K = 3: a second block of 3 candidates is ranked
            assert len(beyond) == 3
            assert page(0, 6)[3:] == beyond  # the same block of K, the same ranking
        finally:
            client.__exit__(None, None, None)


def test_the_service_sets_the_threads_of_one_inference_call(
        tiny_checkpoints: TinyCheckpoints, tmp_path: Path) -> None:
    """torch.set_num_threads is per thread (OpenMP): each inference worker must set it."""
    import asyncio

    import torch

    wanted = torch.get_num_threads() + 1
    with pg_database() as url:
        client = start(make_settings(url, tmp_path / "data", tiny_checkpoints.scan,
                                     tiny_checkpoints.detector, limits={"torch_threads": wanted}))
        try:
            pool = client.app.state.runtime.pool
            assert asyncio.run(pool.run(torch.get_num_threads)) == wanted
        finally:
            client.__exit__(None, None, None)


def test_health_readiness_and_metrics(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    checks = ready.json()["checks"]
    assert set(checks) == {"model", "index", "database"} and all(c["ok"] for c in checks.values())
    assert checks["database"]["detail"] == "postgresql"

    client.get("/search", params={"q": "blue vase"})
    client.post("/annotate", files={"image": ("c.png", image_bytes(5), "image/png")})
    text = client.get("/metrics").text
    for stage in ("extract", "encode", "stage1", "rerank", "decode"):
        assert f'artalign_stage_duration_seconds_count{{stage="{stage}"}}' in text, stage
    assert 'artalign_http_request_duration_seconds_count{method="GET",route="/search"}' in text
    assert 'artalign_http_requests_total{method="GET",route="/search",status="200"}' in text
    fragments = [line for line in text.splitlines()
                 if line.startswith('artalign_index_size{index="fragments"}')]
    assert fragments and float(fragments[0].split()[-1]) > 0


# -- with the trained demo model: are the answers right? -----------------------------------


@pytest.fixture(scope="module")
def demo_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    detector, scan = DEMO_MODELS / "detector.pt", DEMO_MODELS / "scan.pt"
    if not (detector.is_file() and scan.is_file()):
        pytest.skip(f"the trained demo model is not in {DEMO_MODELS}")
    with pg_database() as url:
        client = start(make_settings(url, tmp_path_factory.mktemp("demo-data"), scan, detector))
        yield client
        client.__exit__(None, None, None)


SYNTH_SEED, SYNTH_COUNT = 9001, 16  # unseen by the demo model (trained on seed 7)


@pytest.fixture(scope="module")
def synthetic(demo_client: TestClient) -> list:
    from collection.synth import render

    artworks = [render(SYNTH_SEED, index) for index in range(SYNTH_COUNT)]
    batch = []
    for index, art in enumerate(artworks):
        buffer = io.BytesIO()
        art.image.save(buffer, format="PNG")
        batch.append({"external_id": f"synth-test-{index}", "title": art.object_mention,
                      "captions": art.captions, "image_base64": base64.b64encode(buffer.getvalue()).decode(),
                      "annotations": [{"phrase": g.phrase, "box": list(g.box)} for g in art.groups]})
    report = demo_client.post("/artworks/batch", headers=WRITE, json=batch).json()
    assert report["counts"] == {"created": SYNTH_COUNT}, report
    return artworks


def test_demo_model_annotates_crops_with_their_phrase(demo_client: TestClient, synthetic: list) -> None:
    hits, total = 0, 0
    for art in synthetic:
        for group in art.groups:
            buffer = io.BytesIO()
            art.image.crop(group.box).save(buffer, format="PNG")
            response = demo_client.post("/annotate", params={"limit": 5},
                                        files={"image": ("crop.png", buffer.getvalue(), "image/png")})
            total += 1
            hits += group.phrase in [i["phrase"] for i in response.json()["items"]]
    assert total >= 20
    assert hits / total >= 0.9, f"ground-truth phrase in the top 5 for {hits}/{total} crops"


def test_demo_model_finds_the_fragment_a_phrase_names(demo_client: TestClient, synthetic: list) -> None:
    from index.fragments import iou

    ids = {a["external_id"]: a["id"] for a in
           demo_client.get("/artworks", params={"q": "synth-test-", "limit": 100}).json()["items"]}
    truth: dict[str, list[tuple[int, tuple]]] = {}  # phrase -> (artwork id, box) of every group
    for index, art in enumerate(synthetic):
        for group in art.groups:
            truth.setdefault(group.phrase, []).append((ids[f"synth-test-{index}"], group.box))
    hits = 0
    for phrase, boxes in truth.items():
        response = demo_client.get("/search", params={"q": phrase, "limit": 5})
        hits += any(
            hit["artwork_id"] == artwork_id
            and iou(np.array([hit["box"]]), np.array([box]))[0, 0] >= 0.5
            for hit in response.json()["items"] for artwork_id, box in boxes
        )
    assert hits / len(truth) >= 0.9, \
        f"a top-5 fragment overlaps a box of the phrase for {hits}/{len(truth)} phrases"


SYNONYMS = {"gold": "golden", "red": "crimson", "blue": "azure", "green": "emerald", "black": "ebony",
            "white": "ivory", "purple": "violet", "turquoise": "teal", "pink": "rose", "brown": "chocolate"}


def test_demo_model_reads_a_visitors_own_words(demo_client: TestClient, synthetic: list) -> None:
    """"golden birds" for "two gold birds": the MiniLM demo model reads words its collection
    never used, and says it has no unknown words."""
    from index.fragments import iou

    ids = {a["external_id"]: a["id"] for a in
           demo_client.get("/artworks", params={"q": "synth-test-", "limit": 100}).json()["items"]}
    truth: dict[tuple[str, str], list[tuple[int, tuple]]] = {}  # (colour, motif) -> boxes
    for index, art in enumerate(synthetic):
        for group in art.groups:
            truth.setdefault((group.colour, group.motif.name), []).append(
                (ids[f"synth-test-{index}"], group.box))
    hits = 0
    for (colour, motif), boxes in truth.items():
        plural = next(m.plural for art in synthetic for g in art.groups for m in [g.motif] if m.name == motif)
        answer = demo_client.get("/search", params={"q": f"{SYNONYMS[colour]} {plural}", "limit": 5}).json()
        assert answer["unknown_words"] == []
        hits += any(hit["artwork_id"] == artwork_id
                    and iou(np.array([hit["box"]]), np.array([box]))[0, 0] >= 0.5
                    for hit in answer["items"] for artwork_id, box in boxes)
    assert hits / len(truth) >= 0.7, f"a top-5 fragment shows the thing for {hits}/{len(truth)} synonyms"


def test_demo_top_tens_hold_one_fragment_per_thing(demo_client: TestClient, synthetic: list) -> None:
    from index.fragments import iou
    from models.regions import RegionExtractor

    names = set(RegionExtractor.from_checkpoint(DEMO_MODELS / "detector.pt").config.attribute_names)
    folded = 0
    for phrase in sorted({g.phrase for art in synthetic for g in art.groups}):
        items = demo_client.get("/search", params={"q": phrase, "limit": 10}).json()["items"]
        folded += sum(len(h["also"]) for h in items)
        for i, first in enumerate(items):
            for second in items[i + 1:]:
                assert first["artwork_id"] != second["artwork_id"] or iou(
                    np.array([first["box"]]), np.array([second["box"]]))[0, 0] < 0.7, phrase
            assert len(first["attributes"]) == 3 and {w["word"] for w in first["attributes"]} <= names
    assert folded > 0  # annotation boxes and the detections on them did fold


def test_per_artwork_search_gives_each_artwork_one_hit(demo_client: TestClient, synthetic: list) -> None:
    phrase = sorted({g.phrase for art in synthetic for g in art.groups})[0]
    plain = demo_client.get("/search", params={"q": phrase, "limit": 30}).json()["items"]
    grouped = demo_client.get("/search", params={"q": phrase, "limit": 30, "per_artwork": True}).json()["items"]
    artworks = [hit["artwork_id"] for hit in grouped]
    assert len(artworks) == len(set(artworks)), "two hits of one artwork"
    # Each artwork's hit is its best fragment, and its other candidates are listed in `also`.
    best = {}
    for hit in plain:
        best.setdefault(hit["artwork_id"], hit)
    for hit in grouped:
        if hit["artwork_id"] in best:
            assert hit["fragment_id"] == best[hit["artwork_id"]]["fragment_id"]
    assert len(set(plain_ids := [h["artwork_id"] for h in plain])) < len(plain_ids), \
        "the plain search should show some artwork twice for this test to mean anything"
    assert any(hit["also"] for hit in grouped)
    assert [h["artwork_id"] for h in grouped][:3] == list(dict.fromkeys(plain_ids))[:3]
