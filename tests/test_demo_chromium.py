"""End to end: the demo page driven by real headless Chromium over the DevTools protocol.

Starts the demo app (uvicorn, 127.0.0.1, free port) and Chromium (Debian's `chromium` package,
fresh profile, no network services), uploads an image through the page's file input, types a
question, clicks "Ask", waits, and reads back the rendered answer and the overlay <img>'s
natural size. Skipped only when /usr/bin/chromium is absent.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (/usr/bin/chromium)")

ASSETS = Path(__file__).resolve().parents[1].parent / "shared" / "assets"


class CDP:
    """A minimal synchronous Chrome DevTools Protocol client for one page target."""

    def __init__(self, ws_url: str) -> None:
        from websockets.sync.client import connect

        self.ws = connect(ws_url, max_size=64 * 2**20, open_timeout=20)
        self.ids = itertools.count(1)

    def call(self, method: str, timeout: float = 30, **params):
        msg_id = next(self.ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        deadline = time.time() + timeout
        while True:
            msg = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.time())))
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def js(self, expression: str):
        r = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"JS error in {expression!r}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.1)
        raise TimeoutError(f"timed out waiting for {expression!r}")

    def close(self) -> None:
        self.ws.close()


@contextlib.contextmanager
def launch_chromium(profile: Path):
    """Headless Chromium with a fresh profile, DevTools on 127.0.0.1: yields a CDP page client."""
    proc = subprocess.Popen(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            f"--user-data-dir={profile}",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",
            "--window-size=1280,1600",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.time() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("chromium did not start (no DevToolsActivePort)")
            time.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            pages = [t for t in json.load(r) if t["type"] == "page"]
        cdp = CDP(pages[0]["webSocketDebuggerUrl"])
        cdp.call("Page.enable")
        cdp.call("Runtime.enable")
        cdp.call("DOM.enable")
        try:
            yield cdp
        finally:
            cdp.close()
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # the process group we started, by its id
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@pytest.fixture()
def browser(tmp_path):
    pytest.importorskip("websockets", reason="the CDP client needs the websockets package")
    with launch_chromium(tmp_path / "profile") as cdp:
        yield cdp


def _set_file(cdp: CDP, selector: str, path: Path) -> None:
    root = cdp.call("DOM.getDocument", depth=-1)["root"]["nodeId"]
    node = cdp.call("DOM.querySelector", nodeId=root, selector=selector)["nodeId"]
    assert node, selector
    cdp.call("DOM.setFileInputFiles", nodeId=node, files=[str(path)])


def _click(cdp: CDP, selector: str) -> None:
    """A real mouse click at the centre of the element."""
    root = cdp.call("DOM.getDocument", depth=-1)["root"]["nodeId"]
    node = cdp.call("DOM.querySelector", nodeId=root, selector=selector)["nodeId"]
    cdp.call("DOM.scrollIntoViewIfNeeded", nodeId=node)
    quad = cdp.call("DOM.getBoxModel", nodeId=node)["model"]["content"]
    x, y = sum(quad[0::2]) / 4, sum(quad[1::2]) / 4
    for kind in ("mousePressed", "mouseReleased"):
        cdp.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)


def _ask_in_page(cdp: CDP, base_url: str, image: Path, question: str, budgets: str | None = None):
    cdp.call("Page.navigate", url=base_url)
    cdp.wait_for("document.readyState === 'complete' && !!document.getElementById('ask')", timeout=30)
    _set_file(cdp, "#image", image)
    cdp.js(f"document.getElementById('question').value = {json.dumps(question)}")
    if budgets is not None:
        cdp.js(f"document.getElementById('budgets').value = {json.dumps(budgets)}")
    _click(cdp, "#ask")
    state = cdp.wait_for(
        "['done', 'error'].includes(document.body.dataset.state) && document.body.dataset.state", timeout=120
    )
    return state, cdp.js(
        "({answer: document.getElementById('answer').textContent,"
        " error: document.getElementById('error').textContent,"
        " complete: document.getElementById('overlay').complete,"
        " w: document.getElementById('overlay').naturalWidth,"
        " h: document.getElementById('overlay').naturalHeight,"
        " meta: document.getElementById('meta').textContent})"
    )


def test_demo_page_end_to_end_in_chromium(browser, tmp_path) -> None:
    pytest.importorskip("fastapi")
    from serving_fake import FakePipeline, demo_app
    from uhrbat.io.overlay import render_overlay
    from uhrbat.io.sources import open_image
    from uhrbat.serving import serve_in_thread

    fake = FakePipeline()
    app = demo_app(fake, model_name="fake", overlay_max_side=500)
    img_path = tmp_path / "scene.png"
    Image.new("RGB", (640, 400), (40, 120, 70)).save(img_path)
    question = "How many buildings are next to the river?"
    with serve_in_thread(app) as url:
        assert url.startswith("http://127.0.0.1:")
        state, out = _ask_in_page(browser, url, img_path, question, budgets="5,6,7,8")
        assert state == "done", out
        assert out["answer"] == FakePipeline.answer_for(question)
        assert fake.calls[-1]["budgets"] == [5, 6, 7, 8] and fake.calls[-1]["size"] == (640, 400)
        expected = render_overlay(
            open_image(img_path), fake.last.tokens, fake.last.relevance, question, fake.last.answer, None, max_side=500
        )
        assert out["complete"] and (out["w"], out["h"]) == expected.size
        assert "640×400" in out["meta"]

        # A bad upload shows the server's one-line error in the page.
        bad = tmp_path / "notes.png"
        bad.write_text("not an image")
        state, out = _ask_in_page(browser, url, bad, "q")
        assert state == "error" and "not accepted" in out["error"] and "'notes.png'" in out["error"]


def test_demo_page_with_tiny_model_in_chromium(browser, tiny_pipeline) -> None:
    """The same flow with the real (random, tiny) model: whatever it answers is shown."""
    pytest.importorskip("rasterio")
    from serving_fake import demo_app
    from uhrbat.serving import serve_in_thread

    app = demo_app(tiny_pipeline, model_name="tiny", overlay_max_side=400, max_new_tokens=4)
    with serve_in_thread(app) as url:
        state, out = _ask_in_page(
            browser, url, ASSETS / "aerial" / "neon_osbs_400.tif", "How many trees?", budgets="8,16"
        )
    assert state == "done", out
    assert out["complete"] and out["w"] >= 400 and out["h"] > 400
    assert "visual tokens" in out["meta"] and "400×400" in out["meta"]


STAGE_LABELS = {
    "uploading": "Uploading the image",
    "queued": "Waiting in the queue",
    "reading": "Reading the image",
    "waiting": "Waiting for the model",
    "model": "Preparing the scene",
    "load": "Opening the image",
    "tiles": "Cutting the pyramid into tiles",
    "encode": "Encoding tiles",
    "score": "Scoring relevance",
    "group": "Grouping tokens",
    "select": "Selecting visual tokens",
    "prefill": "Reading the question",
    "answering": "Writing the answer",
    "decode": "Writing the answer",
    "overlay": "Drawing the overlay",
}


def test_demo_page_shows_stage_and_elapsed_time_and_wraps_a_long_answer(browser, tmp_path) -> None:
    """While the model runs the page says which stage it is at and for how long (issue 23: it
    used to say only "Running the model..."); a long answer without spaces wraps inside the page;
    the formats it lists are the ones the server accepts, and a .jp2 is refused with one line."""
    pytest.importorskip("fastapi")
    import re

    from serving_fake import FakePipeline, demo_app
    from uhrbat.serving import serve_in_thread
    from uhrbat.serving.uploads import accepted_formats

    long = "Y" * 3000
    fake = FakePipeline(stage_delay=0.4, step_delay=0.0003, answer_fn=lambda q: long)
    app = demo_app(fake, model_name="fake", overlay_max_side=300, max_new_tokens=4000)
    img = tmp_path / "scene.png"
    Image.new("RGB", (320, 200), (40, 120, 70)).save(img)
    with serve_in_thread(app) as url:
        cdp = browser
        cdp.call("Page.navigate", url=url)
        cdp.wait_for("document.readyState === 'complete' && !!document.getElementById('ask')", timeout=30)
        label = cdp.js("document.querySelector('label[for=image]').textContent")
        assert label == f"Image ({accepted_formats()})" and "2000" not in label
        _set_file(cdp, "#image", img)
        cdp.js("document.getElementById('question').value = 'How many fields?'")
        _click(cdp, "#ask")
        seen, statuses = set(), []
        deadline = time.time() + 60
        while time.time() < deadline:
            state, stage, status = cdp.js(
                "[document.body.dataset.state, document.body.dataset.stage,"
                " document.getElementById('status').textContent]"
            )
            if state != "running" or status.startswith("Done in"):  # answered; the overlay is loading
                break
            seen.add(stage)
            statuses.append(status)
            time.sleep(0.05)
        assert cdp.wait_for("document.body.dataset.state === 'done'", timeout=60)
        shown = [re.fullmatch(r"(.+)\u2026 (\d+\.\d) s", s) for s in statuses if s]
        assert shown and all(shown), statuses
        labels = {m.group(1) for m in shown}  # polled every ~50 ms: a busy machine may miss a stage
        assert len(labels) >= 3 and labels <= set(STAGE_LABELS.values()), labels
        seconds = [float(m.group(2)) for m in shown]
        assert seconds == sorted(seconds) and seconds[-1] - seconds[0] > 1.0  # the clock runs
        assert len(seen) >= 3 and seen <= set(STAGE_LABELS), seen
        assert cdp.js("document.getElementById('answer').textContent") == long
        fits = cdp.js(
            "(() => { const a = document.getElementById('answer');"
            " return [a.scrollWidth <= a.clientWidth + 1,"
            " document.documentElement.scrollWidth <= window.innerWidth]; })()"
        )
        assert fits == [True, True]
        jp2 = tmp_path / "scene.jp2"
        Image.new("RGB", (32, 20)).save(jp2, format="JPEG2000")
        state, out = _ask_in_page(cdp, url, jp2, "q")
        assert state == "error" and "JPEG 2000, which is not accepted" in out["error"], out
