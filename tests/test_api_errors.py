"""Every error path of the API answers an RFC 9457 problem with the right status and a detail
that names what is wrong; and the service survives the database going away."""

from __future__ import annotations

import io
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy.engine import make_url

from tests.conftest import TinyCheckpoints, image_bytes
from tests.test_api import (
    WRITE,
    artwork_form,
    assert_problem,
    make_settings,
    pg_database,
    pg_module_url,  # noqa: F401 (a fixture used by this module)
    start,
)

pytestmark = pytest.mark.postgres

BODY_LIMIT = 200_000
PIXEL_LIMIT = 100 * 100


@pytest.fixture(scope="module")
def client(pg_module_url: str, tiny_checkpoints: TinyCheckpoints,  # noqa: F811
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    settings = make_settings(
        pg_module_url, tmp_path_factory.mktemp("data"), tiny_checkpoints.scan,
        tiny_checkpoints.detector, cors_origins=["https://museum.example"],
        limits={"max_body_bytes": BODY_LIMIT, "max_image_pixels": PIXEL_LIMIT,
                "max_query_chars": 40, "max_inflight": 1},
        retrieval={"candidates": 20},
    )
    client = start(settings)
    response = client.post("/artworks", headers=WRITE, **artwork_form("known-1"))
    assert response.status_code == 201, response.text
    yield client
    client.__exit__(None, None, None)


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_writes_need_a_valid_api_key(client: TestClient, pg_module_url: str) -> None:  # noqa: F811
    assert_problem(client.post("/artworks", **artwork_form("k-1")), 401, "X-API-Key")
    assert_problem(client.post("/artworks", headers={"X-API-Key": "wrong-key-000"},
                               **artwork_form("k-1")), 403, "no valid key")
    assert_problem(client.delete("/artworks/external/known-1"), 401)
    assert_problem(client.post("/annotations", json={"artwork_id": 1, "box": [0, 0, 5, 5],
                                                     "phrase": "x"}), 401)
    assert_problem(client.post("/artworks/batch", json=[]), 401)

    # Keys stored in the database (only their sha256) work until they are revoked.
    from sqlalchemy import create_engine, text

    from app.settings import hash_api_key

    database = create_engine(pg_module_url)
    with database.begin() as connection:
        connection.execute(text(
            "INSERT INTO api_keys (name, key_sha256, created_at, revoked) "
            "VALUES ('museum', :a, now(), false), ('old', :b, now(), true)"),
            {"a": hash_api_key("stored-key-123"), "b": hash_api_key("revoked-key-123")})
    database.dispose()
    created = client.post("/artworks", headers={"X-API-Key": "stored-key-123"}, **artwork_form("k-2", seed=3))
    assert created.status_code == 201
    assert_problem(client.post("/artworks", headers={"X-API-Key": "revoked-key-123"},
                               **artwork_form("k-3")), 403, "revoked")


def test_body_and_image_limits(client: TestClient) -> None:
    big = {"files": {"image": ("big.png", b"\0" * (BODY_LIMIT + 1), "image/png")},
           "data": {"artwork": json.dumps({"external_id": "big"})}}
    assert_problem(client.post("/artworks", headers=WRITE, **big), 413, f"{BODY_LIMIT:,}")

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit must count the bytes
        for _ in range(BODY_LIMIT // 10_000 + 2):
            yield b"x" * 10_000

    chunked = client.post("/annotate", content=chunks(),
                          headers={"Content-Type": "application/json"})
    assert_problem(chunked, 413, f"{BODY_LIMIT:,}")

    too_many_pixels = client.post("/annotate", files={"image": ("wide.png", png(200, 100), "image/png")})
    assert_problem(too_many_pixels, 422, "200x100", f"{PIXEL_LIMIT:,}")
    form = artwork_form("wide-1")
    form["files"]["image"] = ("wide.png", png(101, 100), "image/png")
    assert_problem(client.post("/artworks", headers=WRITE, **form), 422, "wide-1", "pixels")


def test_bad_images_and_bad_documents(client: TestClient) -> None:
    truncated = image_bytes(7, fmt="JPEG")[:300]
    assert_problem(client.post("/annotate", files={"image": ("t.jpg", truncated, "image/jpeg")}),
                   422, "truncated")
    assert_problem(client.post("/annotate", files={"image": ("x.txt", b"hello", "text/plain")}),
                   422, "not an image")
    assert_problem(client.post("/annotate", files={"other": ("a.png", png(8, 8), "image/png")}),
                   422, "'image'")

    form = artwork_form("doc-1")
    form["data"]["artwork"] = "{not json"
    assert_problem(client.post("/artworks", headers=WRITE, **form), 422, "artwork")
    form["data"]["artwork"] = json.dumps({"external_id": "doc-1", "captions": ["a"] * 6})
    body = assert_problem(client.post("/artworks", headers=WRITE, **form), 422, "artwork.captions")
    assert body["errors"][0]["field"] == "artwork.captions"
    form["data"]["artwork"] = json.dumps({"external_id": "doc-1",
                                          "annotations": [{"phrase": "cat", "box": [5, 5, 2, 9]}]})
    assert_problem(client.post("/artworks", headers=WRITE, **form), 422, "annotations.0.box")
    form["data"]["artwork"] = json.dumps({"external_id": "doc-1",
                                          "annotations": [{"phrase": "cat", "box": [5, 5, 200, 9]}]})
    assert_problem(client.post("/artworks", headers=WRITE, **form), 422, "annotations[0].box")
    form["data"]["artwork"] = json.dumps({"external_id": "other"})
    assert_problem(client.put("/artworks/external/doc-1", headers=WRITE, **form), 422, "'other'")

    assert_problem(client.post("/artworks/batch", headers={**WRITE, "Content-Type": "application/x-ndjson"},
                               content=b'{"external_id": "a"}\n{oops\n'), 422, "line 2")
    assert_problem(client.post("/artworks/batch", headers=WRITE, json={"external_id": "a"}),
                   422, "list")


def test_content_type_checks(client: TestClient) -> None:
    assert_problem(client.post("/artworks", headers=WRITE, json={"external_id": "ct-1"}),
                   415, "multipart/form-data")
    assert_problem(client.post("/annotate", content=b"abc", headers={"Content-Type": "text/plain"}),
                   415, "text/plain")
    assert_problem(client.post("/annotations", headers={**WRITE, "Content-Type": "text/plain"},
                               content=b"x"), 415, "application/json")
    assert_problem(client.post("/artworks/batch", headers={**WRITE, "Content-Type": "text/csv"},
                               content=b"x"), 415, "application/x-ndjson")


def test_queries_and_pages(client: TestClient) -> None:
    assert_problem(client.get("/search", params={"q": ""}), 422, "q")
    assert_problem(client.get("/search"), 422, "q")
    assert_problem(client.get("/search", params={"q": "bird " * 9}), 422, "45 characters", "40")
    assert_problem(client.get("/search", params={"q": "?!"}), 422, "no words")
    assert_problem(client.get("/search", params={"q": "bird", "limit": 0}), 422, "limit")
    past_candidates = client.get("/search", params={"q": "bird", "offset": 20, "limit": 10})
    assert past_candidates.status_code == 200 and past_candidates.json()["items"] == []
    assert_problem(client.get("/artworks", params={"limit": 1000}), 422, "limit")


def test_unknown_ids_and_routes(client: TestClient) -> None:
    assert_problem(client.get("/artworks/999999"), 404, "999999")
    assert_problem(client.get("/artworks/999999/image"), 404, "999999")
    assert_problem(client.get("/artworks/999999/thumbnail"), 404)
    assert_problem(client.get("/artworks/999999/annotations"), 404)
    assert_problem(client.get("/fragments/999999/image"), 404, "fragment")
    assert_problem(client.get("/artworks/external/nobody"), 404, "nobody")
    assert_problem(client.delete("/artworks/external/nobody", headers=WRITE), 404, "nobody")
    assert_problem(client.post("/annotate", json={"artwork_id": 999999, "box": [0, 0, 5, 5]}),
                   404, "999999")
    assert_problem(client.post("/annotations", headers=WRITE,
                               json={"artwork_id": 999999, "box": [0, 0, 5, 5], "phrase": "cat"}),
                   404, "999999")
    assert_problem(client.get("/artworks/abc"), 422, "artwork_id")
    assert_problem(client.get("/no/such/path"), 404)
    assert_problem(client.patch("/artworks"), 405)

    known = client.get("/artworks/external/known-1").json()["id"]
    assert_problem(client.post("/annotate", json={"artwork_id": known, "box": [0, 0, 500, 5]}),
                   422, "box")
    assert_problem(client.post("/annotate", json={"artwork_id": known}), 422, "box")


def test_cors_allows_only_the_configured_origins(client: TestClient) -> None:
    preflight = {"Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "X-API-Key"}
    allowed = client.options("/artworks", headers={"Origin": "https://museum.example", **preflight})
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == "https://museum.example"
    refused = client.options("/artworks", headers={"Origin": "https://evil.example", **preflight})
    assert "access-control-allow-origin" not in refused.headers


def test_excess_inference_is_refused_with_retry_after(client: TestClient) -> None:
    """max_inflight is 1: while one search runs, the next is refused at once."""
    engine = client.app.state.runtime.engine
    pool = client.app.state.runtime.pool
    entered, release = threading.Event(), threading.Event()
    original = engine.search_text

    def held_search(*args, **kwargs):  # noqa: ANN202
        entered.set()
        release.wait(30)
        return original(*args, **kwargs)

    engine.search_text = held_search
    try:
        first: dict = {}
        thread = threading.Thread(target=lambda: first.update(
            response=client.get("/search", params={"q": "blue vase"})))
        thread.start()
        assert entered.wait(30) and pool.inflight == 1
        refused = client.get("/search", params={"q": "blue vase"})
        body = assert_problem(refused, 503, "inference slots")
        assert refused.headers["retry-after"].isdigit() and body["type"].endswith(":overloaded")
    finally:
        release.set()
        thread.join(30)
        engine.search_text = original
    assert first["response"].status_code == 200
    assert client.get("/search", params={"q": "blue vase"}).status_code == 200


# -- the database going away ---------------------------------------------------------------


class TcpProxy:
    """Forwards a local port to PostgreSQL; ``cut()`` closes every connection and refuses new
    ones (the database "goes away"), ``restore()`` accepts again on the same port."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.open = True
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.open:
                client.close()
                continue
            upstream = socket.create_connection(self.target)
            with self.lock:
                self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        self.open = False
        with self.lock:
            for s in self.sockets:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
            self.sockets.clear()

    def restore(self) -> None:
        self.open = True

    def close(self) -> None:
        self.cut()
        self.listener.close()


def test_database_outage_answers_503_and_recovers_without_restart(
    tiny_checkpoints: TinyCheckpoints, tmp_path: Path
) -> None:
    with pg_database() as url:
        parsed = make_url(url)
        proxy = TcpProxy((parsed.host or "127.0.0.1", parsed.port or 5432))
        try:
            proxied = parsed.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
            client = start(make_settings(proxied, tmp_path, tiny_checkpoints.scan,
                                         tiny_checkpoints.detector))
            try:
                assert client.post("/artworks", headers=WRITE, **artwork_form("db-1")).status_code == 201
                assert client.get("/readyz").status_code == 200

                proxy.cut()
                ready = client.get("/readyz")
                assert ready.status_code == 503
                checks = ready.json()["checks"]
                assert not checks["database"]["ok"] and checks["model"]["ok"]
                body = assert_problem(client.get("/search", params={"q": "blue vase"}), 503, "database")
                assert body["type"].endswith(":database-unavailable")
                assert_problem(client.get("/artworks"), 503, "database")

                proxy.restore()
                assert client.get("/readyz").status_code == 200
                assert client.get("/search", params={"q": "blue vase"}).json()["items"]
                assert client.get("/artworks").json()["total"] == 1
            finally:
                client.__exit__(None, None, None)
        finally:
            proxy.close()
