"""End-to-end tests of the curator's page: Debian's Chromium, driven by Playwright, against the
real service (started by tests/browser.py on a synthetic demo collection).

Each view leaves a screenshot in test-artifacts/ (git-ignored) for a person to look at.
"""

from __future__ import annotations

import json
import math
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.browser import (
    ARTIFACTS,
    CHROMIUM,
    CHROMIUM_ARGS,
    DEMO_MODELS,
    Service,
    has_demo_model,
    start_service,
    stop_service,
)

pytestmark = [pytest.mark.browser, pytest.mark.slow]

API_KEY = "page-test-key-0123"
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}
DEBOUNCE_MS = 300  # how long typing must pause before the page asks the service


@pytest.fixture(scope="module")
def trained() -> bool:
    """With the trained demo model the answers must be right (the motif's phrase is found);
    with tiny random checkpoints only the page's mechanics are checked."""
    return has_demo_model()


@pytest.fixture(scope="module")
def service(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
            trained: bool) -> Iterator[Service]:
    models = DEMO_MODELS if trained else request.getfixturevalue("tiny_checkpoints").scan.parent
    running = start_service(tmp_path_factory.mktemp("page-service"), models=models,
                            n=8, seed=7, api_key=API_KEY)
    yield running
    stop_service(running)


@pytest.fixture(scope="module")
def browser() -> Iterator:
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium package to run the page tests")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, service: Service) -> Iterator:
    """A fresh browser context (empty localStorage) on the service; fails on script errors."""
    context = browser.new_context(viewport=DESKTOP, base_url=service.url)
    context.clock.install()  # a clock the tests can stop and advance (see type_and_count_requests)
    tab = context.new_page()
    script_errors: list[str] = []
    tab.on("pageerror", lambda error: script_errors.append(str(error)))
    yield tab
    context.close()
    assert not script_errors, f"the page threw: {script_errors}"


def screenshot(tab, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    tab.screenshot(path=str(ARTIFACTS / f"page-{name}.png"), full_page=True)


def collection_artworks(service: Service) -> list:
    from collection.layout import Collection

    return Collection.load(service.collection).artworks


def largest_annotation(service: Service):
    """(artwork, annotation) with the biggest ground-truth box: the easiest motif to draw on."""
    pairs = [(artwork, annotation) for artwork in collection_artworks(service)
             for annotation in artwork.annotations]
    assert pairs, "the synthetic collection has no annotations"

    def area(pair) -> float:
        x1, y1, x2, y2 = pair[1].box
        return (x2 - x1) * (y2 - y1)

    return max(pairs, key=area)


def service_id(service: Service, external_id: str) -> int:
    found = service.get_json(f"/artworks?{urllib.parse.urlencode({'q': external_id, 'limit': 5})}")
    matches = [item["id"] for item in found["items"] if item["external_id"] == external_id]
    assert matches, f"{external_id} is not in the service"
    return matches[0]


def to_screen(image_frame: dict, size: tuple[int, int], x: float, y: float) -> tuple[float, float]:
    """An original-pixel point → the page coordinates of the displayed image."""
    width, height = size
    return (image_frame["x"] + x * image_frame["width"] / width,
            image_frame["y"] + y * image_frame["height"] / height)


def assert_rect_on_box(rect_frame: dict, image_frame: dict, size: tuple[int, int], box) -> None:
    """The SVG rectangle covers `box` (original pixels) scaled onto the displayed image."""
    left, top = to_screen(image_frame, size, box[0], box[1])
    right, bottom = to_screen(image_frame, size, box[2], box[3])
    drawn = (rect_frame["x"], rect_frame["y"],
             rect_frame["x"] + rect_frame["width"], rect_frame["y"] + rect_frame["height"])
    for got, want in zip(drawn, (left, top, right, bottom), strict=True):
        assert math.isclose(got, want, abs_tol=2.0), f"box drawn at {drawn}, expected {(left, top, right, bottom)}"


def type_and_count_requests(tab, selector: str, text: str, url_part: str) -> list[str]:
    """Types `text` into `selector` with the page's clock stopped, and returns the URLs of the
    requests containing `url_part` that went out: none while typing or within the debounce
    delay after the last key, then one once the delay has passed. The page's clock is fake
    (Playwright's clock), so the check does not depend on how fast this machine types."""
    requests: list[str] = []
    tab.on("request", lambda request: requests.append(request.url) if url_part in request.url else None)
    tab.clock.pause_at(tab.evaluate("Date.now()") + 1000)
    tab.locator(selector).press_sequentially(text)
    tab.clock.run_for(DEBOUNCE_MS - 1)
    tab.evaluate("0")  # a round trip: request events sent before it have been delivered
    assert requests == [], f"asked before typing paused for {DEBOUNCE_MS} ms: {requests}"
    with tab.expect_request(lambda request: url_part in request.url):
        tab.clock.run_for(1)
    tab.clock.resume()
    return requests


def assert_controls_named(tab) -> None:
    """Every button, link, field and checkbox on the page has an accessible name."""
    snapshot = tab.locator("body").aria_snapshot()
    unnamed = re.findall(r"^\s*- (?:button|link|textbox|searchbox|checkbox)\b[^\"'\n]*$", snapshot, re.MULTILINE)
    assert not unnamed, f"controls without a name: {unnamed}"


def assert_fits_width(tab) -> None:
    overflow = tab.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
    assert overflow <= 0, f"the page scrolls sideways by {overflow} px at phone width"


def test_browse_grid_and_filter(page, service: Service) -> None:
    artworks = collection_artworks(service)
    page.goto("/")
    cards = page.locator("#browse-grid .card")
    cards.first.wait_for()
    assert cards.count() == min(24, len(artworks))
    assert page.locator("#browse-summary").text_content().endswith(f"of {len(artworks)} artworks")
    assert page.locator("#browse-pager").is_visible() == (len(artworks) > 24)
    assert len(artworks) <= 24, "the paging checks below expect the collection to fit one page"
    first = page.locator("#browse-grid img").first
    # Thumbnails, lazily loaded, not the full images.
    listed = service.get_json("/artworks?limit=1")["items"][0]
    assert first.get_attribute("src") == listed["thumbnail_url"]
    assert first.get_attribute("loading") == "lazy"
    screenshot(page, "browse")

    target = artworks[-1]
    requests = type_and_count_requests(page, "#browse-q", target.id, "/artworks?")
    page.wait_for_function(
        "want => [...document.querySelectorAll('#browse-grid .card-meta')].every(m => m.textContent === want)"
        " && document.querySelectorAll('#browse-grid .card').length > 0",
        arg=target.id,
    )
    assert len(requests) == 1  # one request for the whole id, not one per key
    assert urllib.parse.parse_qs(urllib.parse.urlparse(requests[-1]).query)["q"] == [target.id]
    assert page.evaluate("location.hash") == f"#/browse?q={urllib.parse.quote(target.id)}"

    # Keyboard: Enter on a focused card opens the artwork.
    page.locator("#browse-grid .card").first.focus()
    page.keyboard.press("Enter")
    page.locator("#artwork-title").filter(has_text=target.title or target.id).wait_for()
    assert page.evaluate("location.hash") == f"#/artworks/{service_id(service, target.id)}"

    # Paging: a page past the end says so, and Previous leads back to the artworks.
    page.goto("/#/browse?page=2")
    page.locator("#browse-summary").filter(has_text="past the end").wait_for()
    assert page.locator("#browse-grid .card").count() == 0
    assert page.locator("#browse-next").is_disabled()
    page.locator("#browse-prev").click()
    page.locator("#browse-grid .card").first.wait_for()
    assert page.evaluate("location.hash") == "#/browse"
    assert page.locator("#browse-page").text_content() == "Page 1 of 1"

    page.set_viewport_size(PHONE)
    page.goto("/#/browse")
    page.locator("#browse-grid .card").first.wait_for()
    assert_fits_width(page)
    screenshot(page, "browse-phone")


def test_annotate_by_dragging_a_box_and_accept(page, service: Service, trained: bool) -> None:
    artwork, annotation = largest_annotation(service)
    artwork_id = service_id(service, artwork.id)
    detail = service.get_json(f"/artworks/{artwork_id}")
    size = (detail["width"], detail["height"])

    page.goto(f"/#/artworks/{artwork_id}")
    image = page.locator("#artwork-stage img")
    page.wait_for_function("document.querySelector('#artwork-stage img')?.complete")
    frame = image.bounding_box()

    # Detected fragments are outlined where the service says they are.
    outlined = [fragment for fragment in detail["fragments"] if fragment["source"] != "whole"]
    rects = page.locator("#artwork-stage rect.fragment")
    assert rects.count() == len(outlined)
    if outlined:
        assert_rect_on_box(rects.first.bounding_box(), frame, size, outlined[0]["box"])

    # Drag a box over the motif; the page sends it in original pixels.
    x1, y1, x2, y2 = annotation.box
    with page.expect_response(lambda response: response.url.endswith("/annotate")) as answered:
        page.mouse.move(*to_screen(frame, size, x1, y1))
        page.mouse.down()
        page.mouse.move(*to_screen(frame, size, (x1 + x2) / 2, (y1 + y2) / 2), steps=4)
        page.mouse.move(*to_screen(frame, size, x2, y2), steps=4)
        page.mouse.up()
    body = json.loads(answered.value.request.post_data)
    assert body["artwork_id"] == artwork_id
    pixel = size[0] / frame["width"]  # original pixels per displayed pixel
    for got, want in zip(body["box"], annotation.box, strict=True):
        assert abs(got - want) <= pixel + 1, f"sent box {body['box']}, drawn over {annotation.box}"

    phrases = page.locator("#annotate-results .phrase-text")
    phrases.first.wait_for()
    shown = phrases.all_text_contents()
    if trained:
        assert annotation.phrase in shown, f"{annotation.phrase!r} not among {shown}"
    accepted = annotation.phrase if annotation.phrase in shown else shown[0]
    # Ranked as the service ranked them, each bar as long as its score.
    items = answered.value.json()["items"]
    assert shown == [item["phrase"] for item in items]
    widths = [float(bar.evaluate("bar => bar.style.width").rstrip("%"))
              for bar in page.locator("#annotate-results .bar-fill").all()]
    assert widths == pytest.approx([100 * min(max(item["score"], 0), 1) for item in items], abs=0.1)

    # Accepting needs an API key: without one, the settings dialog asks for it, then it saves.
    row = page.locator("#annotate-results .phrase").filter(has=page.get_by_text(accepted, exact=True))
    row.locator("button.accept").click()
    assert page.locator("#settings").evaluate("dialog => dialog.open")
    assert "needs an API key" in page.locator("#settings-reason").text_content()
    page.locator("#settings-key").fill(API_KEY)
    with page.expect_response(lambda response: response.url.endswith("/annotations")) as stored:
        page.keyboard.press("Enter")
    assert not page.locator("#settings").evaluate("dialog => dialog.open")
    assert stored.value.status == 201
    assert stored.value.request.headers["x-api-key"] == API_KEY
    assert json.loads(stored.value.request.post_data) == {
        "artwork_id": artwork_id, "box": body["box"], "phrase": accepted,
    }
    page.locator("#annotate-results button.saved").wait_for()
    assert_controls_named(page)
    screenshot(page, "annotate")


def test_annotate_with_the_keyboard(page, service: Service) -> None:
    artwork, _ = largest_annotation(service)
    artwork_id = service_id(service, artwork.id)
    detail = service.get_json(f"/artworks/{artwork_id}")
    width, height = detail["width"], detail["height"]
    page.goto(f"/#/artworks/{artwork_id}")
    page.wait_for_function("document.querySelector('#artwork-stage img')?.complete")

    page.locator("#artwork-stage").focus()
    page.keyboard.press("Enter")  # places a box on the middle third
    page.keyboard.press("ArrowRight")  # moves it right by 2% of the width
    with page.expect_request(lambda request: request.url.endswith("/annotate")) as sent:
        page.keyboard.press("Enter")
    step = max(1, round(width * 0.02))
    assert json.loads(sent.value.post_data)["box"] == [
        round(width / 3) + step, round(height / 3), round(2 * width / 3) + step, round(2 * height / 3),
    ]
    page.locator("#annotate-results .phrase").first.wait_for()
    page.keyboard.press("Escape")  # no box: no phrases left to accept for it
    assert page.locator("#artwork-stage rect.selection").count() == 0
    assert page.locator("#annotate-results .phrase").count() == 0

    page.set_viewport_size(PHONE)
    assert_fits_width(page)
    screenshot(page, "annotate-phone")


def test_search_draws_boxes_and_attention(page, service: Service) -> None:
    _, annotation = largest_annotation(service)
    query = annotation.phrase
    page.goto("/#/search")
    requests = type_and_count_requests(page, "#search-q", query, "/search?")
    results = page.locator("#search-results .result")
    results.first.wait_for()
    assert len(requests) == 1, f"one request per keystroke? {requests}"
    assert urllib.parse.parse_qs(urllib.parse.urlparse(requests[-1]).query)["q"] == [query]

    answer = service.get_json(f"/search?{urllib.parse.urlencode({'q': query, 'limit': 12})}")
    assert results.count() == len(answer["items"])
    best = answer["items"][0]
    first = results.first
    first.locator(".figure img").scroll_into_view_if_needed()
    page.wait_for_function("document.querySelector('#search-results .figure img')?.complete")
    assert first.locator("img.crop").get_attribute("src") == best["crop_url"]
    assert_rect_on_box(first.locator("rect.match").bounding_box(), first.locator(".figure img").bounding_box(),
                       (best["width"], best["height"]), best["box"])

    # Hovering a query word shows the regions it attended to, weight as opacity.
    word = best["attention"][0]
    page.get_by_role("button", name=f"Show where “{word['word']}” attended", exact=True).hover()
    attention = first.locator("rect.attention")
    assert attention.count() == len(word["regions"])
    opacities = [float(rect.evaluate("rect => rect.style.fillOpacity")) for rect in attention.all()]
    strongest = max(region["weight"] for region in word["regions"])
    expected = [0.85 * region["weight"] / strongest for region in word["regions"]]
    assert opacities == pytest.approx(expected, abs=1e-3)
    assert_controls_named(page)
    screenshot(page, "search")

    page.set_viewport_size(PHONE)
    assert_fits_width(page)
    screenshot(page, "search-phone")


def test_search_says_what_it_searched_for(page, service: Service) -> None:
    query = "two gold birds and a zebra"
    answer = service.get_json(f"/search?{urllib.parse.urlencode({'q': query, 'limit': 12})}")
    page.goto(f"/#/search?{urllib.parse.urlencode({'q': query})}")
    understood = page.locator("#search-understood")
    understood.wait_for()
    text = understood.inner_text()
    assert answer["phrases"] == ["two gold birds", "zebra"]
    assert "“two gold birds” and “zebra”" in text
    # the words the model could not use (a vocabulary model's; none for MiniLM)
    assert ("Not understood" in text) == bool(answer["unknown_words"])
    assert all(word in text for word in answer["unknown_words"])


def test_search_one_result_per_artwork(page, service: Service) -> None:
    _, annotation = largest_annotation(service)
    query = annotation.phrase
    page.goto(f"/#/search?{urllib.parse.urlencode({'q': query})}")
    page.locator("#search-results .result").first.wait_for()
    with page.expect_response(lambda r: "/search?" in r.url and "per_artwork=true" in r.url):
        page.get_by_label("One result per artwork").check()
    answer = service.get_json(f"/search?{urllib.parse.urlencode({'q': query, 'limit': 12, 'per_artwork': 'true'})}")
    page.wait_for_function("n => document.querySelectorAll('#search-results .result').length === n",
                           arg=len(answer["items"]))
    links = [a.get_attribute("href") for a in page.locator("#search-results .result-title a").all()]
    assert links == [f"#/artworks/{hit['artwork_id']}" for hit in answer["items"]]
    assert len(set(links)) == len(links)
    assert "per_artwork=true" in page.url  # a shared link keeps the choice
    page.reload()
    page.locator("#search-results .result").first.wait_for()
    assert page.get_by_label("One result per artwork").is_checked()


def test_search_error_shows_the_problem_detail(page, service: Service) -> None:
    query = " ".join(["gold"] * 100)  # longer than the service accepts
    try:
        service.get_json(f"/search?{urllib.parse.urlencode({'q': query})}")
    except urllib.error.HTTPError as error:
        problem = json.load(error)
    else:
        pytest.fail("the service accepted a 500-character query")
    page.goto("/#/search")
    page.locator("#search-q").fill(query)
    page.keyboard.press("Enter")
    banner = page.locator("#error")
    banner.wait_for()
    assert problem["detail"] in banner.text_content()
    page.keyboard.press("Escape")
    assert banner.is_hidden()


def test_upload_a_crop(page, service: Service, trained: bool, tmp_path: Path) -> None:
    from PIL import Image

    artwork, annotation = largest_annotation(service)
    crop_path = tmp_path / "motif.png"
    with Image.open(service.collection / artwork.image) as image:
        image.convert("RGB").crop(tuple(round(v) for v in annotation.box)).save(crop_path)

    page.goto("/#/upload")
    with page.expect_response(lambda response: response.url.endswith("/annotate")) as answered:
        page.locator("#upload-file").set_input_files(str(crop_path))
    assert answered.value.ok
    phrases = page.locator("#upload-results .phrase-text")
    phrases.first.wait_for()
    shown = phrases.all_text_contents()
    assert shown == [item["phrase"] for item in answered.value.json()["items"]]
    if trained:
        assert annotation.phrase in shown, f"{annotation.phrase!r} not among {shown}"
    assert page.locator("#upload-results button.accept").count() == 0  # no artwork to annotate
    assert page.locator("#upload-preview").evaluate("image => image.complete && image.naturalWidth") > 0
    screenshot(page, "upload")



def test_keep_an_uploaded_crop_as_a_new_artwork(page, service: Service, tmp_path: Path) -> None:
    """An uploaded crop can be saved as an artwork (with the API key); an id already in use is
    refused, not overwritten; then its phrases can be accepted for the whole image."""
    from PIL import Image

    artwork, annotation = largest_annotation(service)
    crop_path = tmp_path / "kept motif.png"
    with Image.open(service.collection / artwork.image) as image:
        crop = image.convert("RGB").crop(tuple(round(v) for v in annotation.box))
        crop.save(crop_path)
    page.goto("/#/upload")
    page.locator("#upload-file").set_input_files(str(crop_path))
    page.locator("#upload-results .phrase-text").first.wait_for()
    assert page.locator("#upload-keep-id").input_value() == "kept-motif"

    # Someone else's id: refused before anything is written.
    posted: list[str] = []
    page.on("request", lambda r: posted.append(r.url) if r.method == "POST" and "/artworks" in r.url else None)
    page.evaluate(f"localStorage.setItem('artalign.apiKey', {json.dumps(API_KEY)})")
    page.locator("#upload-keep-id").fill(artwork.id)
    page.locator("#upload-keep-save").click()
    page.locator("#error").wait_for()
    assert "exists already" in page.locator("#error-text").text_content()
    assert posted == []

    new_id = "kept-motif-test"
    page.locator("#upload-keep-id").fill(new_id)
    with page.expect_response(lambda r: r.url.endswith("/artworks") and r.request.method == "POST") as saved:
        page.locator("#upload-keep-save").click()
    assert saved.value.status == 201
    report = saved.value.json()
    try:
        page.locator("#upload-keep-saved a").wait_for()
        assert page.locator("#upload-keep-saved a").get_attribute("href") == f"#/artworks/{report['id']}"
        accept = page.locator("#upload-results button.accept")
        assert accept.count() == page.locator("#upload-results .phrase").count() > 0
        phrase = page.locator("#upload-results .phrase-text").first.text_content()
        with page.expect_response(lambda r: r.url.endswith("/annotations")) as stored:
            accept.first.click()
        assert stored.value.status == 201
        assert json.loads(stored.value.request.post_data) == {
            "artwork_id": report["id"], "box": [0, 0, crop.width, crop.height], "phrase": phrase,
        }
        assert phrase in service.get_json(f"/artworks/{report['id']}")["phrases"]
        assert_controls_named(page)
        screenshot(page, "upload-kept")
    finally:
        request = urllib.request.Request(f"{service.url}/artworks/external/{new_id}", method="DELETE",
                                         headers={"X-API-Key": API_KEY})
        urllib.request.urlopen(request, timeout=30).close()


def test_upload_real_photograph_and_bad_files(page, service: Service, egyptian_dir: Path,
                                              tmp_path: Path) -> None:
    photograph = sorted((egyptian_dir / "images-large").glob("*.jpg"))[0]
    page.goto("/#/upload")
    with page.expect_response(lambda response: response.url.endswith("/annotate")) as answered:
        page.locator("#upload-file").set_input_files(str(photograph))
    assert answered.value.ok
    page.locator("#upload-results .phrase").first.wait_for()
    assert photograph.name in page.locator("#upload-name").text_content()

    # Not an image at all: refused in the page, naming the file, without asking the service.
    notes = tmp_path / "notes.txt"
    notes.write_text("not a picture")
    asked: list[str] = []
    page.on("request", lambda request: asked.append(request.url) if "/annotate" in request.url else None)
    page.locator("#upload-file").set_input_files(str(notes))
    page.locator("#error").wait_for()
    assert "notes.txt: not an image" in page.locator("#error-text").text_content()
    assert asked == []

    # Called an image but broken: the service's problem detail is shown.
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    with page.expect_response(lambda response: response.url.endswith("/annotate")) as refused:
        page.locator("#upload-file").set_input_files(str(broken))
    assert refused.value.status == 422
    page.locator("#error-text").filter(has_text=refused.value.json()["detail"]).wait_for()
    assert page.locator("#upload-results .phrase").count() == 0


def test_api_docs_render_with_no_network(browser, service: Service) -> None:
    """/docs lists every operation of the OpenAPI document with nothing loaded from outside:
    any request that is not to the service itself is refused, and there must be none."""
    operations = sum(
        1 for methods in service.get_json("/openapi.json")["paths"].values()
        for method in methods if method in {"get", "post", "put", "delete", "patch"}
    )
    context = browser.new_context(viewport=DESKTOP)
    outside: list[str] = []

    def only_the_service(route) -> None:
        if route.request.url.startswith(service.url):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    context.route("**/*", only_the_service)
    tab = context.new_page()
    script_errors: list[str] = []
    tab.on("pageerror", lambda error: script_errors.append(str(error)))
    try:
        tab.goto(service.url + "/docs")
        tab.locator(".opblock").first.wait_for(timeout=30_000)
        assert tab.locator(".opblock").count() == operations
        assert tab.locator(".opblock-summary-path", has_text="/search").count() >= 1
        screenshot(tab, "api-docs")
    finally:
        context.close()
    assert outside == [], f"the docs page tried to load from outside: {outside}"
    assert not script_errors, f"the docs page threw: {script_errors}"


def test_resize_a_box_by_its_handles(page, service: Service) -> None:
    """A drawn box has eight handles; dragging one with the mouse, or with a finger, moves
    only its edges, and Ctrl+arrows move the top-left corner; each change asks for phrases."""
    artwork, _ = largest_annotation(service)
    artwork_id = service_id(service, artwork.id)
    detail = service.get_json(f"/artworks/{artwork_id}")
    size = width, height = detail["width"], detail["height"]
    page.goto(f"/#/artworks/{artwork_id}")
    page.wait_for_function("document.querySelector('#artwork-stage img')?.complete")
    frame = page.locator("#artwork-stage img").bounding_box()
    pixel = width / frame["width"]  # original pixels per displayed pixel

    def sent_box(action) -> list[float]:
        with page.expect_request(lambda request: request.url.endswith("/annotate")) as sent:
            action()
        return json.loads(sent.value.post_data)["box"]

    def drag(start, end) -> None:
        page.mouse.move(*to_screen(frame, size, *start))
        page.mouse.down()
        page.mouse.move(*to_screen(frame, size, *end), steps=5)
        page.mouse.up()

    box = [width * 0.3, height * 0.3, width * 0.6, height * 0.6]
    drawn = sent_box(lambda: drag(box[:2], box[2:]))
    assert page.locator("#artwork-stage circle.handle").count() == 8

    # The mouse takes the bottom-right handle and pulls it out; the top-left stays put.
    corner = (drawn[2], drawn[3])
    target = (width * 0.8, height * 0.75)
    resized = sent_box(lambda: drag(corner, target))
    assert resized[:2] == drawn[:2]
    assert resized[2] == pytest.approx(target[0], abs=2 * pixel + 1)
    assert resized[3] == pytest.approx(target[1], abs=2 * pixel + 1)
    assert page.locator("#artwork-stage circle.handle").count() == 8

    # A finger takes the left edge's handle (touch events, as a phone sends them).
    touch = page.context.new_cdp_session(page)
    left = to_screen(frame, size, resized[0], (resized[1] + resized[3]) / 2)
    goal = to_screen(frame, size, width * 0.1, (resized[1] + resized[3]) / 2)

    def finger() -> None:
        for kind, (x, y) in (("touchStart", left), ("touchMove", ((left[0] + goal[0]) / 2, left[1])),
                             ("touchMove", goal), ("touchEnd", goal)):
            points = [] if kind == "touchEnd" else [{"x": x, "y": y}]
            touch.send("Input.dispatchTouchEvent", {"type": kind, "touchPoints": points})

    touched = sent_box(finger)
    assert touched[0] == pytest.approx(width * 0.1, abs=2 * pixel + 1)
    assert touched[1:] == resized[1:]

    # The keyboard moves the top-left corner with Ctrl+arrows.
    page.locator("#artwork-stage").focus()
    page.keyboard.press("Control+ArrowUp")
    keyed = sent_box(lambda: page.keyboard.press("Enter"))
    step = max(1, round(height * 0.02))
    assert keyed == [touched[0], max(0, touched[1] - step), touched[2], touched[3]]
    screenshot(page, "resize-handles")


def test_facets_narrow_browse_and_search(page, service: Service) -> None:
    page.goto("/#/browse")
    page.locator("#browse-grid .card").first.wait_for()
    facet = page.locator("#browse-facets fieldset").filter(has=page.locator("legend", has_text="classification"))
    facet.locator("input").first.wait_for()
    counts = service.get_json("/facets?field=classification")["fields"]["classification"]
    labels = [label.inner_text().split() for label in facet.locator("label").all()]
    assert [(" ".join(words[:-1]), int(words[-1])) for words in labels] == \
        [(c["value"], c["count"]) for c in counts]
    chosen = counts[-1]  # the rarest, so the grid visibly shrinks
    box = page.get_by_role("checkbox", name=re.compile(rf"^{re.escape(chosen['value'])} \d+$"))
    with page.expect_request(lambda request: "/artworks?" in request.url):
        box.check()
    wanted = service.get_json(f"/artworks?{urllib.parse.urlencode({'filter': 'classification:' + chosen['value']})}")
    page.wait_for_function("n => document.querySelectorAll('#browse-grid .card').length === n", arg=wanted["total"])
    assert wanted["total"] == chosen["count"]
    assert page.locator("#browse-summary").text_content().endswith(f"classification:{chosen['value']}")
    hash_params = urllib.parse.parse_qs(page.evaluate("location.hash").split("?", 1)[1])
    assert hash_params["filter"] == [f"classification:{chosen['value']}"]
    # The other fields now count under the filter.
    source = service.get_json(f"/facets?{urllib.parse.urlencode({'filter': 'classification:' + chosen['value']})}")
    page.wait_for_function(
        "n => [...document.querySelectorAll('#browse-facets fieldset')].some(f => f.querySelector('legend')"
        ".textContent === 'source' && f.querySelector('.count').textContent === String(n))",
        arg=source["fields"]["source"][0]["count"])
    assert_controls_named(page)
    screenshot(page, "browse-facets")
    box.uncheck()
    page.wait_for_function("n => document.querySelectorAll('#browse-grid .card').length === n",
                           arg=min(24, len(collection_artworks(service))))

    # Search: the same facets restrict the fragments searched.
    _, annotation = largest_annotation(service)
    page.goto(f"/#/search?{urllib.parse.urlencode({'q': annotation.phrase})}")
    page.locator("#search-results .result").first.wait_for()
    search_box = page.locator("#search-facets").get_by_role(
        "checkbox", name=re.compile(rf"^{re.escape(chosen['value'])} \d+$"))
    with page.expect_response(lambda response: "/search?" in response.url and "filter=" in response.url):
        search_box.check()
    answer = service.get_json(f"/search?{urllib.parse.urlencode({'q': annotation.phrase, 'limit': 12, 'filter': 'classification:' + chosen['value']})}")
    page.wait_for_function("n => document.querySelectorAll('#search-results .result').length === n",
                           arg=len(answer["items"]))
    allowed = {item["id"] for item in wanted["items"]}
    assert answer["items"] and {hit["artwork_id"] for hit in answer["items"]} <= allowed
    titles = [t.text_content() for t in page.locator("#search-results .result-title a").all()]
    assert titles == [hit["title"] or hit["external_id"] for hit in answer["items"]]
    screenshot(page, "search-facets")


def test_boxes_are_labelled_with_what_the_detector_saw(page, service: Service) -> None:
    _, annotation = largest_annotation(service)
    answer = service.get_json(f"/search?{urllib.parse.urlencode({'q': annotation.phrase, 'limit': 12})}")
    best = answer["items"][0]
    assert len(best["attributes"]) == 3, "the page's detector has an attribute head"
    words = " · ".join(entry["word"] for entry in best["attributes"][:2])
    page.goto(f"/#/search?{urllib.parse.urlencode({'q': annotation.phrase})}")
    first = page.locator("#search-results .result").first
    first.wait_for()
    assert first.locator("text.box-label").text_content() == words
    assert first.locator(".seen").text_content() == f"Detector: {words}"
    folded = [hit for hit in answer["items"] if hit["also"]]
    assert page.locator("#search-results .also").count() == len(folded)

    detail = service.get_json(f"/artworks/{best['artwork_id']}")
    shown = [f for f in detail["fragments"] if f["source"] != "whole"]
    page.goto(f"/#/artworks/{best['artwork_id']}")
    chips = page.locator("#fragment-list button")
    chips.first.wait_for()
    assert chips.count() == len(shown)  # one per thing: folded fragments are not listed
    for chip, fragment in zip(chips.all(), shown, strict=True):
        assert chip.text_content().endswith(" · ".join(entry["word"] for entry in fragment["attributes"][:2]))
    label = page.locator(".layer-fragments .box-label").first
    assert not label.is_visible()
    chips.first.hover()  # pointing at a fragment's chip shows its box's words on the image
    assert label.is_visible()
    screenshot(page, "artwork-labels")
