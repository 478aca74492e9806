"""The built-in web page in a real browser: Debian's Chromium driven by Playwright against the
real daemon on 127.0.0.1 with the real models. Controls are found by their accessible labels,
so a control that loses its label fails here too.

``SEGD_WEB_SCREENSHOTS=<dir>`` also saves ``screenshot.png`` (desktop, with a result) and
``screenshot-phone.png`` there; that is how ``docs/screenshot.png`` is made.
"""

from __future__ import annotations

import base64
import io
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from conftest import read_mask_png, read_rgb
from daemon import Daemon, start_daemon
from PIL import Image
from playwright.sync_api import Browser, BrowserContext, Page, Playwright, expect, sync_playwright

DM1 = "deeplabv3_mnv2_pascal"
DM05 = "deeplabv3_mnv2_dm05_pascal"
KEY = "page-test-key"
CHROMIUM = Path(os.environ.get("SEGD_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    # a synthetic camera, granted without a permission prompt: the snapshot path runs for real
    "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
]  # fmt: skip
STATIC = Path(__file__).resolve().parent.parent / "segd" / "app" / "static"


# --- fixtures ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[Daemon]:
    d = start_daemon(tmp_path_factory.mktemp("page"), models_dir,
                     "--model", DM1, "--model", DM05, "--accelerator", "cpu")  # fmt: skip
    yield d
    d.stop()


@pytest.fixture(scope="module")
def key_daemon(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[Daemon]:
    d = start_daemon(tmp_path_factory.mktemp("page-key"), models_dir, "--model", DM05,
                     "--accelerator", "cpu", env={"SEGD_API_KEY": KEY})  # fmt: skip
    yield d
    d.stop()


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="module")
def browser(playwright: Playwright) -> Iterator[Browser]:
    """One Chromium for the module (launch() gives it a fresh temporary profile); each test
    gets its own context, so sessionStorage never leaks between tests."""
    if not CHROMIUM.is_file():
        pytest.fail(
            f"Chromium not found at {CHROMIUM} (apt-get install chromium, or set SEGD_CHROMIUM)"
        )
    b = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
    yield b
    b.close()


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    yield ctx
    ctx.close()


def open_page(context: BrowserContext, url: str) -> tuple[Page, list[str]]:
    """The page, with a list that collects uncaught script errors (a test asserts it empty)."""
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(url + "/")
    return page, errors


def wait_for_models(page: Page) -> None:
    expect(page.get_by_label("Model")).to_be_enabled(timeout=30_000)


def upload(page: Page, path: Path) -> None:
    page.get_by_label("Choose an image…").set_input_files(str(path))


def legend(page: Page) -> dict[str, float]:
    """Class label -> area in percent, as the page shows them."""
    expect(page.locator("#details")).to_be_visible(timeout=30_000)
    shown: dict[str, float] = {}
    for row in page.locator("#legend tbody tr").all():
        area = row.locator("td").last.inner_text()
        shown[str(row.get_attribute("data-label"))] = float(re.sub(r"[^0-9.]", "", area))
    return shown


def canvas_rgb(page: Page) -> np.ndarray:
    """The result canvas as the browser drew it (lossless PNG from the canvas itself)."""
    url = page.evaluate("() => document.getElementById('view').toDataURL('image/png')")
    png = base64.b64decode(url.split(",", 1)[1])
    with Image.open(io.BytesIO(png)) as im:
        return np.asarray(im.convert("RGB")).copy()


def set_opacity(page: Page, percent: int) -> None:
    page.get_by_label("Mask opacity").fill(str(percent))
    expect(page.locator("#opacity-value")).to_have_text(f"{percent} %")


def api_json(daemon: Daemon, data: bytes, name: str, **params: str) -> httpx.Response:
    with daemon.client() as c:
        return c.post(
            "/segment",
            params={"format": "json", **params},
            files={"image": (name, data, "image/bmp")},
        )


def save_screenshot(page: Page, name: str) -> None:
    target = os.environ.get("SEGD_WEB_SCREENSHOTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        page.evaluate("() => document.activeElement && document.activeElement.blur()")
        page.screenshot(path=str(Path(target) / name), full_page=True)


# --- serving -------------------------------------------------------------------------------
def test_page_and_its_files_are_public_even_when_the_api_needs_a_key(key_daemon: Daemon) -> None:
    with key_daemon.client() as c:
        assert c.get("/models").status_code == 401
        r = c.get("/")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in r.headers["content-security-policy"]
        for name, media in (("app.js", "text/javascript"), ("style.css", "text/css")):
            r = c.get(f"/static/{name}")
            assert r.status_code == 200 and r.headers["content-type"].startswith(media), name
            again = c.get(f"/static/{name}", headers={"If-None-Match": r.headers["etag"]})
            assert again.status_code == 304 and again.content == b""
        for path in (
            "/static/nope.js",
            "/static/..%2Fpage.py",
            "/static/%2e%2e%2fmain.py",
            "/static/",
        ):
            r = c.get(path)
            assert r.status_code == 404 and r.json()["error"] == "not_found", path
        assert "page-test-key" not in c.get("/").text


def test_page_loads_nothing_from_other_hosts() -> None:
    """The Pi may be offline: no CDN, no web fonts, no absolute URLs in the shipped files."""
    for name in ("index.html", "app.js", "style.css"):
        text = (STATIC / name).read_text()
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.I), name
        assert "@import" not in text and "url(" not in text, name


def test_api_docs_render_offline(daemon: Daemon, context: BrowserContext) -> None:
    """/docs (Swagger UI) loads its script and styles from the daemon itself: with every other
    host unreachable, the operations still show."""
    elsewhere: list[str] = []

    def only_loopback(route: Any) -> None:
        if route.request.url.startswith(daemon.url):
            route.continue_()
        else:
            elsewhere.append(route.request.url)
            route.abort()

    context.route("**/*", only_loopback)
    page = context.new_page()
    page.goto(daemon.url + "/docs")
    expect(page.get_by_text("/segment", exact=True).first).to_be_visible(timeout=30_000)
    expect(page.get_by_text("Segment an image").first).to_be_visible()
    assert elsewhere == []


# --- a result ------------------------------------------------------------------------------
def test_uploaded_photo_shows_the_api_class_areas_and_the_mask_over_the_photo(
    daemon: Daemon, context: BrowserContext, test_data: Path
) -> None:
    bird = test_data / "bird_segmentation.bmp"
    expected = api_json(daemon, bird.read_bytes(), bird.name).json()
    fraction = {c["label"]: c["fraction"] for c in expected["classes"]}
    with daemon.client() as c:
        r = c.post(
            "/segment",
            params={"format": "png"},
            files={"image": (bird.name, bird.read_bytes(), "image/bmp")},
        )
    mask = read_mask_png(r.content)
    with Image.open(io.BytesIO(r.content)) as im:
        palette = np.array((im.getpalette() or [])[: 3 * 256], np.uint8).reshape(-1, 3)

    page, script_errors = open_page(context, daemon.url)
    wait_for_models(page)
    options = page.get_by_label("Model").locator("option")
    expect(options).to_have_count(2)
    expect(page.get_by_label("Model")).to_have_value(DM1)  # the daemon's default
    expect(page.locator("#model-info")).to_contain_text("Backend: cpu")
    upload(page, bird)

    shown = legend(page)
    assert set(shown) == set(fraction)
    assert abs(shown["bird"] - 100 * fraction["bird"]) <= 0.5, (shown, fraction)
    assert 15 < shown["bird"] < 30
    expect(page.locator("#served")).to_contain_text(f"{DM1} on cpu")
    stages = page.locator("#timings tbody td:first-child").all_inner_texts()
    assert {"decode", "invoke", "postprocess", "total"} <= set(stages)
    expect(page.get_by_role("img", name=re.compile("bird"))).to_be_visible()

    photo = read_rgb(bird)
    set_opacity(page, 0)  # the photo alone
    drawn = canvas_rgb(page)
    assert drawn.shape == photo.shape and drawn.std() > 10
    assert np.abs(drawn.astype(int) - photo).max() <= 1
    set_opacity(page, 100)  # class colours over the objects, background untouched
    drawn = canvas_rgb(page)
    objects = mask != 0
    assert objects.mean() > 0.15
    assert np.abs(drawn[objects].astype(int) - palette[mask[objects]]).max() <= 1
    assert np.abs(drawn[~objects].astype(int) - photo[~objects]).max() <= 1
    set_opacity(page, 60)
    drawn = canvas_rgb(page)
    blend = 0.4 * photo[objects] + 0.6 * palette[mask[objects]]
    assert np.abs(drawn[objects] - blend).max() <= 2
    save_screenshot(page, "screenshot.png")
    assert script_errors == []


def test_changing_model_or_keep_aspect_segments_the_same_photo_again(
    daemon: Daemon, context: BrowserContext, test_data: Path
) -> None:
    bird = test_data / "bird.bmp"
    data = bird.read_bytes()
    page, script_errors = open_page(context, daemon.url)
    sent: list[str] = []
    page.on("request", lambda req: sent.append(req.url) if "/segment" in req.url else None)
    wait_for_models(page)
    upload(page, bird)
    expect(page.locator("#served")).to_contain_text(f"{DM1} on cpu", timeout=30_000)

    page.get_by_label("Model").select_option(DM05)
    expect(page.locator("#served")).to_contain_text(f"{DM05} on cpu", timeout=30_000)
    expected = api_json(daemon, data, bird.name, model=DM05).json()
    shown = legend(page)
    assert set(shown) == {c["label"] for c in expected["classes"]}
    for c in expected["classes"]:  # shown to 0.1 %, tiny classes as "<0.1 %"
        assert abs(shown[c["label"]] - 100 * c["fraction"]) <= 0.1, (shown, expected)

    page.get_by_label("Keep aspect ratio").check()
    expected = api_json(daemon, data, bird.name, model=DM05, keep_aspect="true").json()
    shown = legend(page)  # the check hid the old result at once; this waits for the new one
    assert set(shown) == {c["label"] for c in expected["classes"]}
    for c in expected["classes"]:  # shown to 0.1 %, tiny classes as "<0.1 %"
        assert abs(shown[c["label"]] - 100 * c["fraction"]) <= 0.1, (shown, expected)
    assert any("keep_aspect=true" in u and f"model={DM05}" in u and "format=png" in u for u in sent), sent
    assert not any("format=json" in u for u in sent), sent  # one request (one inference) per image
    assert script_errors == []


# --- errors --------------------------------------------------------------------------------
def test_a_text_file_shows_the_api_error_as_the_api_phrased_it(
    daemon: Daemon, context: BrowserContext, tmp_path: Path, test_data: Path
) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("these are not pixels\n")
    with daemon.client() as c:
        r = c.post(
            "/segment",
            params={"format": "json"},
            files={"image": (text.name, text.read_bytes(), "text/plain")},
        )
    assert r.status_code >= 400
    api_error = r.json()

    page, script_errors = open_page(context, daemon.url)
    wait_for_models(page)
    upload(page, test_data / "bird_segmentation.bmp")  # a result first: the error must replace it
    expect(page.locator("#details")).to_be_visible(timeout=30_000)
    upload(page, text)
    alert = page.get_by_role("alert")
    expect(alert).to_be_visible(timeout=30_000)
    expect(page.locator("#error-detail")).to_have_text(api_error["detail"])
    expect(page.locator("#error-code")).to_have_text(f"{api_error['error']} · HTTP {r.status_code}")
    expect(page.locator("#details")).to_be_hidden()
    expect(page.locator("#view")).to_be_hidden()

    upload(page, test_data / "bird_segmentation.bmp")  # and a good image clears it again
    expect(page.locator("#details")).to_be_visible(timeout=30_000)
    expect(alert).to_be_hidden()
    assert script_errors == []


def test_api_key_is_asked_for_once_kept_for_the_session_and_sent(
    key_daemon: Daemon, context: BrowserContext, test_data: Path
) -> None:
    with key_daemon.client() as c:
        refusal = c.get("/models").json()["detail"]
    page, script_errors = open_page(context, key_daemon.url)
    key_box = page.get_by_label("API key")
    expect(key_box).to_be_visible(timeout=30_000)
    expect(page.locator("#auth-message")).to_contain_text(refusal)
    expect(page.get_by_label("Model")).to_be_disabled()

    key_box.fill("not-the-key")
    page.get_by_role("button", name="Use key").click()
    expect(page.locator("#auth-message")).to_contain_text("refused")
    expect(key_box).to_be_visible()

    key_box.fill(KEY)
    page.get_by_role("button", name="Use key").click()
    wait_for_models(page)
    expect(key_box).to_be_hidden()
    upload(page, test_data / "bird_segmentation.bmp")
    assert "bird" in legend(page)
    assert page.evaluate("() => sessionStorage.getItem('segd-api-key')") == KEY
    assert page.evaluate("() => localStorage.length") == 0  # not kept beyond the session

    page.reload()  # entered once: a reload in the same tab does not ask again
    wait_for_models(page)
    expect(key_box).to_be_hidden()
    upload(page, test_data / "bird_segmentation.bmp")
    assert "bird" in legend(page)

    page.get_by_role("button", name="Forget the API key").click()
    expect(key_box).to_be_visible(timeout=30_000)
    assert script_errors == []


# --- camera and phone ----------------------------------------------------------------------
def test_camera_snapshot_is_segmented(daemon: Daemon, context: BrowserContext) -> None:
    page, script_errors = open_page(context, daemon.url)
    wait_for_models(page)
    page.get_by_role("button", name="Use camera").click()
    video = page.get_by_label("Camera preview")
    expect(video).to_be_visible()
    page.wait_for_function("() => document.getElementById('video').videoWidth > 0", timeout=15_000)
    size = page.evaluate(
        "() => [document.getElementById('video').videoWidth, document.getElementById('video').videoHeight]"
    )
    page.get_by_role("button", name="Take snapshot").click()
    expect(video).to_be_hidden()
    shown = legend(page)
    assert shown and abs(sum(shown.values()) - 100) < 0.5 * len(shown)
    expect(page.locator("#served")).to_contain_text(f"{size[0]} × {size[1]} px")
    assert (
        page.evaluate(
            "() => [document.getElementById('view').width, document.getElementById('view').height]"
        )
        == size
    )
    assert script_errors == []


def test_camera_button_is_hidden_without_getusermedia(daemon: Daemon, browser: Browser) -> None:
    """What a browser shows on plain http to a Pi's LAN address (not a secure context)."""
    ctx = browser.new_context()
    ctx.add_init_script(
        "Object.defineProperty(Navigator.prototype, 'mediaDevices', {get: () => undefined})"
    )
    try:
        page, script_errors = open_page(ctx, daemon.url)
        wait_for_models(page)
        expect(page.get_by_label("Choose an image…")).to_be_attached()
        expect(page.get_by_role("button", name="Use camera")).to_be_hidden()
        assert script_errors == []
    finally:
        ctx.close()


def test_page_fits_a_phone_screen(daemon: Daemon, browser: Browser, test_data: Path) -> None:
    ctx = browser.new_context(viewport={"width": 390, "height": 844}, device_scale_factor=2,
                              is_mobile=True, has_touch=True)  # fmt: skip
    try:
        page, script_errors = open_page(ctx, daemon.url)
        wait_for_models(page)
        upload(page, test_data / "bird.bmp")
        assert "bird" in legend(page)
        assert page.evaluate("() => document.documentElement.scrollWidth") <= 390
        box = page.locator("#view").bounding_box()
        assert box is not None and 300 < box["width"] <= 390
        for control in ("Model", "Keep aspect ratio", "Mask opacity"):
            b = page.get_by_label(control).bounding_box()
            assert b is not None and b["x"] >= 0 and b["x"] + b["width"] <= 390, control
        save_screenshot(page, "screenshot-phone.png")
        assert script_errors == []
    finally:
        ctx.close()


def test_result_is_scrolled_into_view_after_an_upload_on_a_phone(daemon: Daemon, browser: Browser, test_data: Path) -> None:
    ctx = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    try:
        page, script_errors = open_page(ctx, daemon.url)
        wait_for_models(page)
        heading = "() => document.getElementById('result-heading').getBoundingClientRect().top"
        assert page.evaluate(heading) > 600  # at the bottom of the screen, under the controls
        upload(page, test_data / "bird.bmp")
        assert "bird" in legend(page)
        page.wait_for_function(f"() => {{ const top = ({heading})(); return top >= -1 && top < 200; }}", timeout=10_000)
        assert script_errors == []
    finally:
        ctx.close()


# --- configured cameras --------------------------------------------------------------------
@pytest.fixture(scope="module")
def camera_daemon(tmp_path_factory: pytest.TempPathFactory, models_dir: Path, test_data: Path) -> Iterator[Daemon]:
    from camera import Camera
    from test_sources import jpeg, write_config

    tmp = tmp_path_factory.mktemp("page-camera")
    cam = Camera([jpeg(test_data / "bird.bmp")], fps=5)
    config = write_config(tmp, {"door": {"url": cam.url + "/stream", "fps": 3, "model": DM05}})
    d = start_daemon(tmp, models_dir, "--config", str(config), "--model", DM05, "--accelerator", "cpu",
                     env={"SEGD_API_KEY": KEY})  # fmt: skip
    yield d
    d.stop()
    cam.stop()


def test_configured_camera_shows_its_live_overlay(camera_daemon: Daemon, context: BrowserContext) -> None:
    page, script_errors = open_page(context, camera_daemon.url)
    page.get_by_label("API key").fill(KEY)
    page.get_by_role("button", name="Use key").click()
    wait_for_models(page)
    expect(page.get_by_role("heading", name="Cameras")).to_be_visible(timeout=10_000)
    expect(page.get_by_label("Camera", exact=True)).to_have_value("door")
    view = page.locator("#source-view")
    expect(view).to_have_attribute("src", re.compile(r"^blob:"), timeout=30_000)
    page.wait_for_function("() => document.getElementById('source-view').naturalWidth > 0")
    size = page.evaluate("() => [document.getElementById('source-view').naturalWidth, document.getElementById('source-view').naturalHeight]")
    assert size == [512, 343]  # bird.bmp
    expect(page.locator("#source-info")).to_contain_text("bird")
    first = view.get_attribute("src")
    expect(view).not_to_have_attribute("src", str(first), timeout=10_000)  # it keeps updating
    # the picture shown is the daemon's overlay of the camera's frame
    shown = page.evaluate("""() => { const img = document.getElementById('source-view');
        const c = document.createElement('canvas'); c.width = img.naturalWidth; c.height = img.naturalHeight;
        c.getContext('2d').drawImage(img, 0, 0); return c.toDataURL('image/png'); }""")
    with Image.open(io.BytesIO(base64.b64decode(shown.split(",", 1)[1]))) as im:
        got = np.asarray(im.convert("RGB")).astype(np.int16)
    r = httpx.get(camera_daemon.url + "/sources/door/latest", params={"format": "overlay"}, headers={"X-API-Key": KEY})
    with Image.open(io.BytesIO(r.content)) as im:
        expected = np.asarray(im.convert("RGB")).astype(np.int16)
    assert np.abs(got - expected).mean() < 2.0  # the same picture every frame (a still camera)
    assert script_errors == []
