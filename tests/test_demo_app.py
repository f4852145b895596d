"""The demo web app's HTTP API, with a deterministic fake pipeline (no model, no browser)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the demo needs fastapi (pip install fastapi uvicorn python-multipart)")
pytest.importorskip("multipart", reason="the demo needs python-multipart")
from fastapi.testclient import TestClient  # noqa: E402

from uhrbat.errors import BudgetError  # noqa: E402
from uhrbat.serving.demo import create_app, parse_budget_field  # noqa: E402
from uhrbat.serving.fake import FakePipeline  # noqa: E402

ASSETS = Path(__file__).resolve().parents[1].parent / "shared" / "assets"


def _png(w: int = 300, h: int = 200) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (90, 140, 60)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture()
def client_and_fake():
    fake = FakePipeline()
    app = create_app(fake, model_name="fake-model", overlay_max_side=400)
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
    r = client.post("/api/ask", files={"image": ("field.png", _png(), "image/png")},
                    data={"question": "How many fields?", "budgets": "4, 5,6,7", "max_new_tokens": "12"})
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["answer"] == FakePipeline.answer_for("How many fields?")
    assert fake.calls[-1]["budgets"] == [4, 5, 6, 7] and fake.calls[-1]["max_new_tokens"] == 12
    assert data["image_size"] == [300, 200] and data["kept"] == 3 + 4 + 5 + 6 and data["merged"] == 4
    png = client.get(data["overlay_url"] if data["overlay_url"].startswith("/") else "/" + data["overlay_url"])
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(png.content)) as im:
        assert list(im.size) == data["overlay_size"] and im.size[0] >= 400
    gj = client.get("/" + data["geojson_url"]).json()
    assert gj["type"] == "FeatureCollection" and gj["coordinate_space"] == "pixel" and gj["answer"] == data["answer"]


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
        ({"image": ("a.png", _png(), "image/png")}, {"question": "q", "budgets": "1,2,x,4"}, 400, "non-negative"),
        ({"image": ("a.png", _png(), "image/png")}, {"question": "q", "budgets": "1,2"}, 400, "4 scales"),
        ({"image": ("a.png", _png(), "image/png")}, {"question": "   "}, 400, "empty"),
        ({"image": ("a.png", _png(), "image/png")}, {"question": "q", "bands": "4,3,2"}, 400, "band list"),
        ({"image": ("e.png", b"", "image/png")}, {"question": "q"}, 400, "empty"),
    ],
)
def test_bad_requests_are_clear_json_errors(client_and_fake, files, data, status, needle) -> None:
    client, _ = client_and_fake
    r = client.post("/api/ask", files=files, data=data)
    assert r.status_code == status and needle in r.json()["error"]
    assert "/tmp" not in r.json()["error"]  # names the upload, not the server's temp file


def test_pipeline_crash_is_reported_as_json(client_and_fake) -> None:
    client, fake = client_and_fake

    def boom(*a, **k):
        raise RuntimeError("out of memory on the fake GPU")

    fake.ask = boom  # type: ignore[method-assign]
    with TestClient(client.app, raise_server_exceptions=False) as c:
        r = c.post("/api/ask", files={"image": ("a.png", _png(), "image/png")}, data={"question": "q"})
    assert r.status_code == 500 and "out of memory" in r.json()["error"]


def test_unknown_result_and_budget_parser() -> None:
    app = create_app(FakePipeline())
    with TestClient(app) as c:
        assert c.get("/api/result/nope/overlay.png").status_code == 404
        assert c.get("/healthz").json() == {"ok": True, "model_loaded": True}
    assert parse_budget_field(" 80, 320 ,600,2000") == [80, 320, 600, 2000]
    assert parse_budget_field("") is None
    with pytest.raises(BudgetError):
        parse_budget_field("-1,2")


def test_lazy_pipeline_factory() -> None:
    made = []

    def factory():
        made.append(1)
        return FakePipeline(scales=(672, 1344), budgets=(3, 4))

    app = create_app(pipeline_factory=factory)
    with TestClient(app) as c:
        assert not made and c.get("/healthz").json()["model_loaded"] is False
        r = c.post("/api/ask", files={"image": ("a.png", _png(40, 40), "image/png")}, data={"question": "q"})
        assert r.status_code == 200 and made == [1] and r.json()["kept"] == 2 + 3
