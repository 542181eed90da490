"""The Gateway's web pages in a real headless browser (Debian's Chromium driven by Playwright over the DevTools
protocol; no browser download) against the session's Serve app on the tiny model: upload an image, run single-
and multi-turn, check the drawn points, zoom windows and crops against the JSON answer, the endpoint's 4xx
messages on the page, and the file browser on a predictions file.

Skips with the reason when Chromium or Playwright is missing (scripts/setup.sh installs both as root).
VIGORL_SCREENSHOTS=docs writes the README's screenshots (docs/web_*.png) while it runs.
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def png(width: int, height: int) -> bytes:
    image = Image.new("RGB", (width, height), (235, 240, 250))
    image.paste((200, 30, 30), (width // 3, height // 3, width // 3 + 40, height // 3 + 40))
    image.paste((30, 60, 200), (2 * width // 3, height // 2, 2 * width // 3 + 30, height // 2 + 60))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.skip("Debian's Chromium is not installed "
                    "(apt-get install -y chromium; scripts/setup.sh does it as root)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the dev extra)")
    with sync_api.sync_playwright() as playwright:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser, serve_app):
    context = browser.new_context(viewport={"width": 1180, "height": 820})
    page = context.new_page()
    yield page
    context.close()


def test_pages_are_served_without_a_token(serve_app):
    import httpx

    for path, kind in (("/", "text/html"), ("/browse", "text/html"), ("/web/view.js", "text/javascript"),
                       ("/web/view.css", "text/css")):
        response = httpx.get(serve_app.url + path)
        assert response.status_code == 200 and response.headers["content-type"].startswith(kind), path
    page = httpx.get(serve_app.url + "/").text
    assert "web/view.js" in page and "http" not in page.replace("http-equiv", "")  # nothing from elsewhere
    for bad in ("/web/nope.js", "/web/..%2Fpages.py", "/web/index.html"):
        assert httpx.get(serve_app.url + bad).status_code == 404, bad


def shoot(page, name: str) -> None:
    """Save the README's screenshot docs/<name>.png when VIGORL_SCREENSHOTS=docs (kept small: the whole page
    at 900 px wide, 256 colours)."""
    if os.environ.get("VIGORL_SCREENSHOTS") != "docs":
        return
    shot = Image.open(io.BytesIO(page.screenshot(full_page=True))).convert("RGB")
    shot = shot.resize((900, round(shot.height * 900 / shot.width)), Image.Resampling.LANCZOS)
    shot.quantize(256).save(REPO_ROOT / "docs" / f"{name}.png", optimize=True)


def shown_at(x: float, y: float, size: tuple[int, int]) -> tuple[float, float]:
    """Where view.js draws a point: itself, or (outside the image) the nearest edge point, as trace_image.place."""
    (w, h), r = size, max(size) / 90
    if 0 <= x < w and 0 <= y < h:
        return x, y
    return min(max(x, r + 1), w - r - 2), min(max(y, r + 1), h - r - 2)


def ask(page, serve_app, image: bytes, query: str, mode: str, options: str = "", task: str = "visual_search",
        token: str | None = None, max_tokens: int = 64) -> tuple[int, dict]:
    page.goto(serve_app.url + "/")
    page.fill("#token", serve_app.token if token is None else token)
    page.set_input_files("#image", files=[{"name": "scene.png", "mimeType": "image/png", "buffer": image}])
    page.wait_for_function("document.getElementById('status').textContent.startsWith('image:')")
    page.fill("#query", query)
    page.fill("#options", options)
    page.select_option("#mode", mode)
    page.select_option("#task", task)
    page.fill("#max-tokens", str(max_tokens))
    with page.expect_response("**/v1/grounded", timeout=300_000) as answer:
        page.click("#send")
    page.wait_for_function("!document.getElementById('send').disabled", timeout=60_000)
    return answer.value.status, answer.value.json()


def drawn(page, selector: str) -> list[dict]:
    """Each drawn mark: its data attributes, SVG attributes, and where its centre landed on the screen relative
    to the image, in ORIGINAL-image pixels (so a mark drawn in the wrong place shows)."""
    return page.eval_on_selector_all(selector, """(marks) => marks.map((m) => {
        const img = m.closest('.stage').querySelector('img.original').getBoundingClientRect();
        const svg = m.ownerSVGElement.viewBox.baseVal;
        const r = (m.querySelector('circle') || m).getBoundingClientRect();
        return {data: {...m.dataset}, class: m.getAttribute('class'), x: m.getAttribute('x'), y: m.getAttribute('y'),
                width: m.getAttribute('width'), height: m.getAttribute('height'),
                screen: [(r.left + r.width / 2 - img.left) * svg.width / img.width,
                         (r.top + r.height / 2 - img.top) * svg.height / img.height]};
    })""")


def test_single_turn_points_drawn_where_the_answer_says(page, serve_app):
    status, body = ask(page, serve_app, png(640, 480), "Where is the red square?", "single", task="grounding")
    assert status == 200, body
    viewbox = page.get_attribute("svg.overlay", "viewBox")
    assert viewbox == "0 0 640 480" and body["image"]["original_size"] == [640, 480]
    expected = [(i, p["original"]["x"], p["original"]["y"]) for i, s in enumerate(body["steps"]) for p in s["points"]]
    marks = drawn(page, "svg.overlay g.point")
    assert expected and len(marks) == len(expected)
    for mark, (step, x, y) in zip(marks, expected):
        assert int(mark["data"]["step"]) == step
        assert (float(mark["data"]["x"]), float(mark["data"]["y"])) == (x, y)
        sx, sy = shown_at(x, y, (640, 480))  # the random model often points outside the image: edge, hollow
        assert mark["screen"] == [pytest.approx(sx, abs=1.5), pytest.approx(sy, abs=1.5)]
        assert ("outside" in mark["class"]) == ((sx, sy) != (x, y))
    assert page.locator("svg.overlay rect.window").count() == 0 and page.locator("img.crop").count() == 0
    assert page.locator("li.step").count() == len(body["steps"])
    summary = page.inner_text(".summary")
    assert f"finish\n{body['finish']}" in summary and f"total {body['usage']['total_tokens']}" in summary
    step = expected[0][0]
    page.hover(f"li.step[data-step='{step}']")  # hovering a step highlights its point
    assert "hl" in page.get_attribute(f"svg.overlay g.point[data-step='{step}']", "class")
    shoot(page, "web_single_turn")


def test_multi_turn_windows_and_crops_match_the_answer(page, serve_app):
    status, body = ask(page, serve_app, png(500, 375), "What colour is the small square?", "multi",
                       options="red\nblue", max_tokens=96)  # a planned zoom turn needs ~80 tokens
    assert status == 200 and len(body["zooms"]) == 2, body  # the app's planned zooms
    windows = drawn(page, "svg.overlay rect.window")
    points = drawn(page, "svg.overlay rect.zoom-point")
    for j, zoom in enumerate(body["zooms"]):
        x1, y1, x2, y2 = zoom["window"]["original"]
        w = windows[j]
        assert int(w["data"]["zoom"]) == j
        assert [float(w[k]) for k in ("x", "y", "width", "height")] == pytest.approx([x1, y1, x2 - x1, y2 - y1])
        assert w["screen"] == [pytest.approx((x1 + x2) / 2, abs=1.5), pytest.approx((y1 + y2) / 2, abs=1.5)]
        assert points[j]["screen"] == [pytest.approx(zoom["point"]["original"]["x"], abs=1.5),
                                       pytest.approx(zoom["point"]["original"]["y"], abs=1.5)]
        # the crop is shown beside the turn that asked for it, and it is the answer's crop
        crop = page.locator(f"section.turn[data-turn='{zoom['turn']}'] .zoom[data-zoom='{j}'] img.crop")
        assert crop.get_attribute("src") == "data:image/png;base64," + zoom["crop_png"]
        assert crop.evaluate("img => img.complete && img.naturalWidth") == zoom["crop_size"][0]
    assert page.locator("section.turn").count() == body["turns"] == 3
    assert len(drawn(page, "svg.overlay g.point")) == sum(len(s["points"]) for s in body["steps"])
    page.hover(".zoom[data-zoom='1']")
    assert "hl" in page.get_attribute("svg.overlay rect.window[data-zoom='1']", "class")
    shoot(page, "web_multi_turn")


def test_errors_show_the_endpoints_message(page, serve_app):
    status, body = ask(page, serve_app, b"this is not an image", "Where?", "single")
    assert status == 400 and body["error"]["param"] == "image"
    error = page.locator("#error")
    assert error.is_visible() and body["error"]["message"] in error.inner_text()
    assert error.inner_text().startswith("HTTP 400: ")
    assert page.locator("#result .trace").count() == 0
    shoot(page, "web_error")
    status, body = ask(page, serve_app, png(64, 48), "Where?", "single", token="wrong")
    assert status == 401 and body["error"]["message"] in page.inner_text("#error")


def test_browse_a_predictions_file(page, serve_app, tmp_path: Path):
    from vigorl_core.evals import evaluation as E
    from vigorl_core.frames import FrameMap

    image = tmp_path / "images" / "screen.png"
    image.parent.mkdir()
    image.write_bytes(png(800, 600))
    preds = []
    for i, (answer, category) in enumerate([("(140, 105)", "icon"), ("(10, 10)", "icon"), ("(139, 104)", "text")]):
        sample = E.Sample(id=f"s{i}", task="grounding", source="screenspot_v2", images=[str(image)],
                          question="Click the OK button", answer="(400, 300, 480, 360)",
                          bbox=(400.0, 300.0, 480.0, 360.0), category=category)
        text = (f"<think> The dialog is at (60, 40). The OK button is at (130, 100). Let me verify it at "
                f"(135, 101). </think>\n<answer> {answer} </answer>")
        preds.append(E.make_prediction(sample, text, mode="grounded", frame=FrameMap((800, 600), (252, 189))))
    predictions = tmp_path / "predictions.jsonl"
    predictions.write_text("".join(p.model_dump_json() + "\n" for p in preds))

    page.goto(serve_app.url + "/browse")
    page.set_input_files("#images", str(image.parent))
    page.set_input_files("#file", str(predictions))
    page.wait_for_function("document.getElementById('status').textContent.includes('traces shown')")
    assert page.locator("tr.row").count() == 3
    page.select_option("#verdict", "incorrect")
    assert page.locator("tr.row").count() == 1 and "s1" in page.inner_text("tr.row")
    page.select_option("#verdict", "all")
    page.select_option("#category", "icon")
    assert page.locator("tr.row").count() == 2
    page.click("tr.row >> nth=0")
    page.wait_for_selector("#view img.original")
    marks = drawn(page, "svg.overlay g.point")
    assert [m["screen"] for m in marks] == [[pytest.approx(p.x, abs=1.5), pytest.approx(p.y, abs=1.5)]
                                            for p in preds[0].points_original]
    assert page.get_attribute("svg.overlay rect.truth", "width") == "80"  # the ground-truth box, original frame
    answer = preds[0].answer_point_original
    assert float(page.get_attribute("svg.overlay circle.answer", "cx")) == pytest.approx(answer.x)
    assert "Click the OK button" in page.inner_text(".summary")
    shoot(page, "web_browse")
