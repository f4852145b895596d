"""The demo web app's HTTP API, with a deterministic fake pipeline (no model, no browser)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the demo needs fastapi (pip install fastapi uvicorn python-multipart)")
pytest.importorskip("multipart", reason="the demo needs python-multipart")
from fastapi.testclient import TestClient

from serving_fake import FakePipeline, demo_app

ASSETS = Path(__file__).resolve().parents[1].parent / "shared" / "assets"


def _png(w: int = 300, h: int = 200) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (90, 140, 60)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture()
def client_and_fake():
    fake = FakePipeline()
    app = demo_app(fake, model_name="fake-model", overlay_max_side=400)
    with TestClient(app) as client:
        yield client, fake


def test_page_has_the_form(client_and_fake) -> None:
    client, _ = client_and_fake
    r = client.get("/")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    for needle in ('id="image"', 'id="question"', 'id="budgets"', 'value="8,16,24,32"', "fake-model", 'id="overlay"'):
        assert needle in r.text
    assert "http://" not in r.text.replace("http://127.0.0.1", "") and "https://" not in r.text  # no CDNs


def test_ask_returns_answer_overlay_and_geojson(client_and_fake) -> None:
    client, fake = client_and_fake
    r = client.post(
        "/api/ask",
        files={"image": ("field.png", _png(), "image/png")},
        data={"question": "How many fields?", "budgets": "4, 5,6,7", "max_new_tokens": "40"},
    )
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["answer"] == FakePipeline.answer_for("How many fields?")
    assert fake.calls[-1]["budgets"] == [4, 5, 6, 7] and fake.calls[-1]["max_new_tokens"] == 40
    assert data["image_size"] == [300, 200] and data["kept"] == 3 + 4 + 5 + 6 and data["merged"] == 4
    png = client.get(data["overlay_url"] if data["overlay_url"].startswith("/") else "/" + data["overlay_url"])
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(png.content)) as im:
        assert list(im.size) == data["overlay_size"] and im.size[0] >= 400
    assert data["geojson_url"].endswith("/kept.pixels.json")  # not georeferenced: never pixels as lon/lat
    gj = client.get("/" + data["geojson_url"]).json()
    assert gj["format"] == "uhrbat.pixel-boxes/1" and "type" not in gj and gj["answer"] == data["answer"]
    assert gj["image"]["path"] == "field.png"  # the uploaded file's name, not a server temp file
    assert client.get("/" + data["geojson_url"].replace(".pixels.json", ".geojson")).status_code == 404


def test_uploads_are_decoded_untrusted_inside_the_decode_section(client_and_fake, monkeypatch) -> None:
    import contextlib

    import uhrbat.io
    import uhrbat.io.sources

    entered = []
    real_section, real_open = uhrbat.io.decode_section, uhrbat.io.sources.open_image

    @contextlib.contextmanager
    def counting_section(*a, **k):
        with real_section(*a, **k):
            entered.append("in")
            yield
            entered.append("out")

    def checked_open(path, **kw):
        assert entered and entered[-1] == "in", "decoded outside uhrbat.io.decode_section()"
        entered.append(kw.get("trust"))
        return real_open(path, **kw)

    monkeypatch.setattr(uhrbat.io, "decode_section", counting_section)
    monkeypatch.setattr(uhrbat.io.sources, "open_image", checked_open)
    client, _ = client_and_fake
    r = client.post("/api/ask", files={"image": ("field.png", _png(), "image/png")}, data={"question": "q"})
    assert r.status_code == 200, r.text
    assert entered[:3] == ["in", "untrusted", "out"]


def test_page_and_openai_api_share_one_app(client_and_fake) -> None:
    import base64

    client, fake = client_and_fake
    url = "data:image/png;base64," + base64.b64encode(_png(50, 40)).decode()
    r = client.post(
        "/v1/chat/completions",
        json={
            "model": "fake-model",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": url}},
                        {"type": "text", "text": "How many fields?"},
                    ],
                }
            ],
        },
    )
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == FakePipeline.answer_for("How many fields?")
    assert fake.calls[-1]["size"] == (50, 40)


def test_geotiff_upload_gives_wgs84_geojson(client_and_fake) -> None:
    pytest.importorskip("rasterio")
    client, _ = client_and_fake
    tif = (ASSETS / "aerial" / "neon_osbs_400.tif").read_bytes()
    r = client.post("/api/ask", files={"image": ("neon.tif", tif, "image/tiff")}, data={"question": "Trees?"})
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["georeferenced"] is True and data["image_size"] == [400, 400]
    gj = client.get("/" + data["geojson_url"]).json()
    assert gj["coordinate_space"] == "wgs84"
    lon, lat = gj["features"][0]["geometry"]["coordinates"][0][0]
    assert -82.1 < lon < -81.9 and 29.6 < lat < 29.8


@pytest.mark.parametrize(
    "files, data, status, needle",
    [
        ({"image": ("notes.png", b"not an image at all", "image/png")}, {"question": "q"}, 400, "'notes.png'"),
        ({"image": ("a.png", _png(), "image/png")}, {"question": "q", "budgets": "1,2,x,4"}, 400, "'x'"),
        ({"image": ("a.png", _png(), "image/png")}, {"question": "q", "budgets": "1,2"}, 400, "4 scales"),
        ({"image": ("a.png", _png(), "image/png")}, {"question": "   "}, 400, "empty"),
        ({"image": ("a.png", _png(), "image/png")}, {"question": "q", "bands": "4,3,2"}, 400, "band list"),
        ({"image": ("e.png", b"", "image/png")}, {"question": "q"}, 400, "empty"),
        ({}, {"question": "q"}, 400, "choose an image"),
        ({"image": ("a.png", _png(), "image/png")}, {"question": "q", "max_new_tokens": "many"}, 400, "integer"),
    ],
)
def test_bad_requests_are_clear_json_errors(client_and_fake, files, data, status, needle) -> None:
    client, _ = client_and_fake
    r = client.post("/api/ask", files=files or None, data=data)
    err = r.json()["error"]  # one error shape for the whole app (OpenAI's), never FastAPI's 422 `detail`
    assert r.status_code == status and needle in err["message"] and set(err) == {"message", "type", "param", "code"}
    assert "/tmp" not in err["message"]  # names the upload, not a server path


def test_pipeline_crash_is_reported_as_json(client_and_fake) -> None:
    client, fake = client_and_fake

    def boom(*a, **k):
        raise RuntimeError("out of memory on the fake GPU")

    fake.chat_batch = boom  # type: ignore[method-assign]
    with TestClient(client.app, raise_server_exceptions=False) as c:
        r = c.post("/api/ask", files={"image": ("a.png", _png(), "image/png")}, data={"question": "q"})
    assert r.status_code == 500 and "out of memory" in r.json()["error"]["message"]


def test_unknown_result_and_health() -> None:
    app = demo_app(FakePipeline())
    with TestClient(app) as c:
        assert c.get("/api/result/nope/overlay.png").status_code == 404
        health = c.get("/health").json()
        assert health["status"] == "ok" and health["model_loaded"] is True


def test_lazy_pipeline_factory() -> None:
    made = []

    def factory():
        made.append(1)
        return FakePipeline(scales=(672, 1344), budgets=(3, 4))

    app = demo_app(pipeline_factory=factory)
    with TestClient(app) as c:
        assert not made and c.get("/health").json()["model_loaded"] is False
        r = c.post("/api/ask", files={"image": ("a.png", _png(40, 40), "image/png")}, data={"question": "q"})
        assert r.status_code == 200 and made == [1] and r.json()["kept"] == 2 + 3


def _encoded(fmt: str, w: int = 60, h: int = 40) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (90, 140, 60)).save(buf, format=fmt)
    return buf.getvalue()


def test_the_page_lists_exactly_the_formats_the_untrusted_reader_accepts(client_and_fake) -> None:
    """One source of truth: the page used to claim COG and JPEG2000 while a .jp2 was refused."""
    import re

    from uhrbat.io.formats import UNTRUSTED_FORMATS
    from uhrbat.io.sources import _ACCEPTED
    from uhrbat.serving.uploads import FORMAT_NAMES, accepted_formats

    client, fake = client_and_fake
    page = client.get("/").text
    label = re.search(r'<label for="image">Image \((.*?)\)</label>', page).group(1)
    assert label == accepted_formats() == _ACCEPTED  # the reader's own wording of its allow-list
    assert [n for n in FORMAT_NAMES if n in UNTRUSTED_FORMATS] == list(UNTRUSTED_FORMATS)
    assert 'accept=".png,.jpg,.jpeg,.tif,.tiff"' in page and "JPEG2000" not in page
    for name, fmt in (("a.png", "PNG"), ("a.jpg", "JPEG"), ("a.tif", "TIFF")):
        r = client.post("/api/ask", files={"image": (name, _encoded(fmt), "image/x")}, data={"question": "q"})
        assert r.status_code == 200 and r.json()["image_size"] == [60, 40], (name, r.text)
    r = client.post("/api/ask", files={"image": ("a.jp2", _encoded("JPEG2000"), "image/jp2")}, data={"question": "q"})
    assert r.status_code == 400 and "JPEG 2000, which is not accepted" in r.json()["error"]["message"]
    assert f"send a {label} file" in r.json()["error"]["message"]
    assert len(fake.calls) == 3


def _sse(text: str) -> list[tuple[str, dict]]:
    events = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((lines["event"], json.loads(lines["data"])))
    return events


def test_the_page_api_streams_the_stages_then_the_result(client_and_fake) -> None:
    client, _ = client_and_fake
    sse = {"Accept": "text/event-stream"}
    r = client.post("/api/ask", files={"image": ("a.png", _png(), "image/png")}, data={"question": "q"}, headers=sse)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = _sse(r.text)
    stages = [d["stage"] for e, d in events if e == "stage"]
    assert stages == [
        "reading",
        "waiting",
        "model",
        "load",
        "tiles",
        "encode",
        "score",
        "group",
        "select",
        "prefill",
        "decode",
        "answering",
        "overlay",
    ]
    assert events[-1][0] == "result" and events[-1][1]["answer"] == FakePipeline.answer_for("q")
    # an image that fails to decode (after the request was accepted) is an error event ...
    bad = {"image": ("notes.png", b"not an image", "image/png")}
    events = _sse(client.post("/api/ask", files=bad, data={"question": "q"}, headers=sse).text)
    assert events[-1][0] == "error" and "'notes.png'" in events[-1][1]["error"]["message"]
    # ... and a bad option, found before, a plain 400
    r = client.post(
        "/api/ask", files={"image": ("a.png", _png(), "image/png")}, data={"question": "q", "budgets": "1"}, headers=sse
    )
    assert r.status_code == 400 and "4 scales" in r.json()["error"]["message"]
