"""The browser camera page: its router (GET / and /web/...), and a real headless Chromium against a live server on
127.0.0.1 with a fake camera playing a real clip: the page asks for the API key, streams, draws the results, and its
slider changes the stream's budget on the server. A screenshot is kept under tests/artifacts/."""

from __future__ import annotations

import shutil
import time
from fractions import Fraction
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from bench.live_server import live_server
from server.api import web

SERVER_ARGS = ["--model", "deit-tiny-patch16-224", "--budget-tokens", "50", "--threads", "1", "--log-level", "warning"]
API_KEY = "page-test-key"
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMEDRIVER = shutil.which("chromedriver")


def test_web_router_serves_the_page_and_nothing_else():
    app = FastAPI()
    app.include_router(web.router)
    with TestClient(app) as client:
        page = client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert '<script src="/web/app.js">' in page.text and "budget-slider" in page.text
        script = client.get("/web/app.js")
        assert script.status_code == 200 and "javascript" in script.headers["content-type"]
        assert "/v1/streams/" in script.text and "sessionStorage" in script.text
        assert client.get("/web/style.css").headers["content-type"].startswith("text/css")
        for missing in ("/web/nothing.js", "/web/..%2Fcamera.py", "/web/.hidden.js", "/web/index.py"):
            assert client.get(missing).status_code == 404, missing
    assert {"index.html", "app.js", "style.css"} <= {p.name for p in web.web_dir().iterdir()}


def write_y4m(video: Path, path: Path, size: tuple[int, int] = (320, 240), seconds: float = 2.0,
              fps: int = 15) -> Path:
    """The clip as a raw yuv420p .y4m (what Chromium's fake camera plays, looping), resized, about `seconds` long."""
    import av

    with av.open(str(video)) as source, av.open(str(path), "w", format="yuv4mpegpipe") as out:
        stream = out.add_stream("rawvideo", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for count, frame in enumerate(source.decode(video=0)):
            if count >= seconds * fps:
                break
            image = frame.to_image().resize(size)
            out.mux(stream.encode(av.VideoFrame.from_image(image).reformat(format="yuv420p")))
        out.mux(stream.encode())
    return path


@pytest.fixture
def chromium(real_video, tmp_path):
    """A headless Chromium with a fake camera playing the real clip; skips when Chromium or its driver is absent."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (test extras)")
    if not CHROMIUM or not CHROMEDRIVER:
        pytest.skip("chromium and chromedriver are not installed (Debian: chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    y4m = write_y4m(real_video, tmp_path / "camera.y4m")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-proxy-server",
                "--window-size=1200,1000", "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-video-capture={y4m}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver, script: str, timeout_s: float, what: str):
    """Poll a JS expression until it is truthy; returns its value."""
    end = time.monotonic() + timeout_s
    while True:
        value = driver.execute_script(f"return ({script});")
        if value:
            return value
        if time.monotonic() > end:
            state = driver.execute_script("return JSON.stringify(Object.assign({}, window.eventful, {history: []}))")
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}; page state: {state}")
        time.sleep(0.1)


def test_page_streams_a_fake_camera_draws_results_and_moves_the_budget(chromium, real_video, tmp_path):
    from selenium.webdriver.common.by import By

    stream_id = "browser-cam"
    with live_server(SERVER_ARGS, tmp_path / "server.log", env={"EVENTFUL_API_KEY": API_KEY}) as base, \
            httpx.Client(base_url=base, trust_env=False, headers={"Authorization": f"Bearer {API_KEY}"}) as http:
        chromium.get(f"{base}/?stream={stream_id}&fps=8&width=320")
        # the REST call on load gets 401: the page asks for the key
        wait_for(chromium, "document.getElementById('key-dialog').open", 15, "the API key prompt")
        chromium.find_element(By.ID, "key-input").send_keys(API_KEY)
        chromium.find_element(By.ID, "key-submit").click()
        wait_for(chromium, "window.eventful.numPatches", 15, "the stream's budget")
        assert chromium.execute_script("return sessionStorage.getItem('eventful.apiKey')") == API_KEY
        assert chromium.find_element(By.ID, "budget-slider").get_attribute("max") == "196"

        chromium.find_element(By.ID, "start").click()
        wait_for(chromium, "window.eventful.results >= 10 && window.eventful.draws > 0", 60, "10 results drawn")
        page = chromium.execute_script(
            "const s = window.eventful; return {results: s.results, sent: s.sent, caption: s.drawnCaption, "
            "drawn: s.drawnResult, label: document.getElementById('stat-label').textContent, "
            "frame: s.lastFrameSize, connected: s.connected}")
        assert page["connected"] and page["sent"] >= page["results"] >= 10
        top = page["drawn"]["outputs"]["top"][0]
        dense = " dense" if page["drawn"]["dense"] else ""
        assert page["caption"] == f"{top['label']} {top['score']:.2f}  [r={page['drawn']['budget']}{dense}]"
        assert page["label"].startswith("class_")  # the stats table shows the top class (random weights: class_<i>)
        assert page["frame"] == {"w": 320, "h": 240}  # the fake camera's frames, at most 320 wide
        # the caption really is on the overlay canvas: its banner pixels are opaque
        alpha = chromium.execute_script(
            "const c = document.getElementById('overlay'); return c.getContext('2d').getImageData(2, 2, 1, 1).data[3]")
        assert alpha > 0
        seen = http.get(f"/v1/streams/{stream_id}").json()
        assert seen["connected"] and seen["frames_received"] >= page["results"]

        # the slider: a PUT of the stream's budget, then frames computed with it
        chromium.execute_script(
            "const s = document.getElementById('budget-slider'); s.value = 20;"
            "s.dispatchEvent(new Event('input')); s.dispatchEvent(new Event('change'));")
        end = time.monotonic() + 15
        while http.get(f"/v1/streams/{stream_id}/budget").json()["effective_tokens"] != 20:
            assert time.monotonic() < end, "the slider did not change the stream's budget"
            time.sleep(0.1)
        assert http.get(f"/v1/streams/{stream_id}/budget").json()["source"] == "override"
        wait_for(chromium, "window.eventful.budget === 20 && window.eventful.drawnCaption.includes('[r=20')", 30,
                 "a result computed with the new budget")
        time.sleep(1.0)  # let the graphs show a second of the new budget
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shot = ARTIFACTS / "camera-page.png"
        assert chromium.save_screenshot(str(shot))
        print(f"screenshot: {shot}")
        chromium.find_element(By.ID, "stop").click()
        wait_for(chromium, "!window.eventful.connected", 10, "the page to disconnect")

        # a local video file instead of the camera, on the same stream
        before = chromium.execute_script("return window.eventful.results")
        chromium.find_element(By.ID, "file-input").send_keys(str(real_video))
        chromium.find_element(By.ID, "start").click()
        wait_for(chromium, f"window.eventful.results >= {before + 5} && window.eventful.connected", 60,
                 "results from the video file")
        assert chromium.execute_script("return document.getElementById('video').videoWidth") == 320
        chromium.find_element(By.ID, "stop").click()
        final = chromium.execute_script("const s = window.eventful; return [s.errors, s.results, s.reconnects]")
        seen = http.get(f"/v1/streams/{stream_id}").json()
    assert final[0] == 0 and final[1] >= 15 and final[2] == 0
    assert seen["frames_failed"] == 0 and seen["frames_processed"] >= final[1]
    assert shot.stat().st_size > 10_000


def test_page_sends_typed_queries_and_draws_boxes_labelled_with_them(chromium, tmp_path):
    """The named random-weight OWLv2 (built-in fallback tokenizer): queries typed before Start are sent as the
    control message once the stream connects, the server keeps them for the stream, the drawn boxes carry them;
    a bad query is answered with an error the page shows, and the stream goes on."""
    from selenium.webdriver.common.by import By

    args = ["--model", "owlv2-base-patch16", "--image-size", "64", "--detect-threshold", "0.0", "--max-boxes", "3",
            "--default-queries", "cat", "--threads", "1", "--log-level", "warning"]  # fmt: skip
    stream_id = "browser-owl"
    with live_server(args, tmp_path / "server.log") as base, httpx.Client(base_url=base, trust_env=False) as http:
        chromium.get(f"{base}/?stream={stream_id}&fps=4&width=320")
        box = chromium.find_element(By.ID, "queries")
        box.send_keys("person, forklift")
        chromium.find_element(By.ID, "queries-send").click()
        assert "sent when the stream starts" in chromium.find_element(By.ID, "queries-info").text
        chromium.find_element(By.ID, "start").click()
        wait_for(chromium, "window.eventful.queriesAnswer", 30, "the server's answer to the queries")
        assert chromium.execute_script("return window.eventful.queriesAnswer") == ["person", "forklift"]
        assert http.get(f"/v1/streams/{stream_id}/queries").json()["queries"] == ["person", "forklift"]
        wait_for(chromium, "window.eventful.drawnBoxes > 0", 60, "boxes drawn")
        labels = chromium.execute_script("return window.eventful.drawnResult.outputs.boxes.map((b) => b.label)")
        assert labels and set(labels) <= {"person", "forklift"}
        box.clear()
        box.send_keys("x" * 70 + "\n")  # Enter sends too
        wait_for(chromium, "window.eventful.queriesError", 15, "the error about the bad query")
        assert chromium.execute_script("return window.eventful.queriesError").startswith("invalid_queries")
        before = chromium.execute_script("return window.eventful.results")
        wait_for(chromium, f"window.eventful.results >= {before + 2}", 30, "results after the bad query")
        assert http.get(f"/v1/streams/{stream_id}/queries").json()["queries"] == ["person", "forklift"]
        chromium.find_element(By.ID, "stop").click()
