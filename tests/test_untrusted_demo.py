"""Hostile uploads to `uhrbat demo` (issue 8, finding 1): a GDAL VRT disguised as a PNG is a 4xx,
its target file is never read, a `/vsicurl/` URL in it is never fetched, and the answer does not
reveal whether a server path exists."""

from __future__ import annotations

import http.server
import threading
from typing import ClassVar

import pytest

pytest.importorskip("fastapi", reason="the demo needs fastapi (pip install fastapi uvicorn python-multipart)")
pytest.importorskip("multipart", reason="the demo needs python-multipart")
from fastapi.testclient import TestClient

from serving_fake import FakePipeline, demo_app
from untrusted_corpus import png_bytes, vrt_raw, vrt_source


class _Counter(http.server.BaseHTTPRequestHandler):
    hits: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        _Counter.hits.append(self.path)
        self.send_response(200)
        self.end_headers()
        self.wfile.write(png_bytes(8, 8))

    do_HEAD = do_GET

    def log_message(self, *args) -> None:
        pass


@pytest.fixture()
def loopback():
    _Counter.hits = []
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Counter)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}", _Counter.hits
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.fixture()
def client():
    fake = FakePipeline()
    with TestClient(demo_app(fake, model_name="fake", overlay_max_side=300)) as c:
        yield c, fake


def _ask(c: TestClient, name: str, data: bytes):
    return c.post("/api/ask", files={"image": (name, data, "image/png")}, data={"question": "What is here?"})


def test_vrt_uploads_are_4xx_and_touch_nothing(client, loopback, tmp_path) -> None:
    c, fake = client
    url, hits = loopback
    secret = tmp_path / "passwd"
    secret.write_text("root:x:0:0:the-secret-line\n" * 40)
    server_image = tmp_path / "server.png"
    server_image.write_bytes(png_bytes(64, 16))
    bodies = {}
    for label, data in {
        "raw-over-secret": vrt_raw(str(secret)),
        "raw-over-missing": vrt_raw(str(tmp_path / "no-such-file")),
        "source-over-server-image": vrt_source(str(server_image)),
        "vsicurl": vrt_source(f"/vsicurl/{url}/x.png"),
    }.items():
        r = _ask(c, "innocent.png", data)
        assert 400 <= r.status_code < 500, (label, r.status_code, r.text)
        assert "the-secret-line" not in r.text and str(tmp_path) not in r.text
        bodies[label] = (r.status_code, r.json())
    assert hits == []  # no request ever reached the loopback server
    assert fake.calls == []  # nothing was decoded into a question for the model
    # An existing and a missing target get the same answer: the endpoint is no file-existence oracle.
    assert bodies["raw-over-secret"] == bodies["raw-over-missing"]


def test_png_upload_still_answers(client) -> None:
    c, fake = client
    r = _ask(c, "field.png", png_bytes(120, 80))
    assert r.status_code == 200, r.text
    assert fake.calls[-1]["size"] == (120, 80)
