"""Request bodies (issue 18, items 4 and 7): the JSON body is read off the event loop with big
data: URLs decoded piece by piece into a private file — equal to `json.loads` + strict base64 for
any body split anywhere, never the whole body in memory — and non-JSON numbers (NaN, Infinity,
1e999, 5,000-digit integers, budgets past int64) are 400s in OpenAI's error format."""

from __future__ import annotations

import base64
import binascii
import http.client
import io
import json
import random
import threading
import tracemalloc
from urllib.parse import urlparse

import pytest
from PIL import Image

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from test_serve_api import MODEL, data_url, server, user  # noqa: E402
from uhrbat.serving.body import JsonBodyReader  # noqa: E402
from uhrbat.serving.uploads import Base64Spool, Spool  # noqa: E402


# ----------------------------------------------------------------------------- equivalence
def test_base64_spool_equals_strict_b64decode_for_any_split() -> None:
    rng = random.Random(7)
    for _ in range(3000):
        text = base64.b64encode(rng.randbytes(rng.randint(0, 60)))
        for _ in range(rng.randint(0, 2)):  # padding in odd places, stray characters
            k = rng.randrange(len(text) + 1)
            text = text[:k] + rng.choice([b"=", b"==", b"A", b"AA", b"===="]) + text[k:]
        try:
            expected = base64.b64decode(text, validate=True)
        except binascii.Error:
            expected = None
        out = Base64Spool(Spool())
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 6))))
        for a, b in zip([0, *cuts], [*cuts, len(text)]):
            out.write(text[a:b])
        out.finish()
        got = None if out.error else open(out.spool.path, "rb").read()
        out.spool.discard()
        assert got == expected, (text, cuts)


def _decoded(value, spools=None):
    """A parsed body with every base64 data: URL (spooled or inline) replaced by its bytes."""
    if isinstance(value, str):
        if spools and value in spools:
            s = spools[value]
            return ("bytes", s.header, None if s.error else open(s.body.spool.path, "rb").read())
        if value.startswith("data:") and "," in value:
            header, _, payload = value[5:].partition(",")
            if "base64" in [f.strip().lower() for f in header.split(";")][1:]:
                try:
                    return ("bytes", header, base64.b64decode(payload, validate=True))
                except (binascii.Error, ValueError):  # ValueError: non-ASCII text
                    return ("bytes", header, None)
        return value
    if isinstance(value, dict):
        return {k: _decoded(v, spools) for k, v in value.items()}
    if isinstance(value, list):
        return [_decoded(v, spools) for v in value]
    return value


def test_body_reader_equals_json_loads_for_bodies_split_anywhere() -> None:
    """Random chat bodies (escaped slashes, \\u escapes, broken base64, stray bytes), each fed
    in random pieces, spooling from 100 bytes on: the parsed value and every image's bytes equal
    `json.loads` + `b64decode(validate=True)`; a body json.loads refuses is refused."""
    rng = random.Random(11)
    spooled = 0
    for _ in range(1500):
        payload = base64.b64encode(rng.randbytes(rng.randint(0, 400))).decode()
        if rng.random() < 0.3 and payload:
            k = rng.randrange(len(payload))
            payload = payload[:k] + rng.choice(["=", "-", " ", "\n", "A", "\\", "é", '"', "\x01"]) + payload[k:]
        url = rng.choice(["data:image/png;base64,", "data:image/tiff;BASE64,", "data:;base64,", "data:x,"]) + payload
        text = rng.choice(['q "x" \\ é', "data:image/png;base64,AAAA"])
        body = {"model": "m", "messages": [user(text, url)], "t": rng.choice([1, 1.5, "data:", [], {"data:x": 1}])}
        raw = json.dumps(body, ensure_ascii=rng.random() < 0.5)
        if rng.random() < 0.3:
            raw = raw.replace("/", "\\/")  # what PHP's json_encode sends
        if rng.random() < 0.1:
            raw = raw.replace("A", "\\u0041")
        data = raw.encode()
        if rng.random() < 0.1:
            k = rng.randrange(len(data))
            data = data[:k] + bytes([rng.randrange(256)]) + data[k + 1 :]
        try:
            expected = json.loads(data)
            expected = _decoded(expected) if isinstance(expected, dict) else "refused"
        except ValueError:
            expected = "refused"
        reader = JsonBodyReader(1 << 24, spool_after=100)
        cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(0, 30))))
        try:
            for a, b in zip([0, *cuts], [*cuts, len(data)]):
                reader.feed(data[a:b])
            parsed = reader.finish()
        except Exception as e:  # noqa: BLE001
            if "only accepted as an image_url" in str(e):
                continue  # a big data: URL outside messages.N.content.M.image_url.url: refused by design
            got = "refused"
        else:
            got = _decoded(parsed.value, parsed.spools)
            spooled += bool(parsed.spools)
            parsed.release()
        if got != expected and expected == "refused":
            # invalid JSON inside an invalid base64 payload: refused for its base64 (also a 400)
            assert ("bytes", "image/png;base64", None) in _flat(got) or any(
                x[2] is None for x in _flat(got) if isinstance(x, tuple)
            ), data
            continue
        assert got == expected, data
    assert spooled > 500  # the spooling path really ran


def _flat(value):
    if isinstance(value, dict):
        return [y for v in value.values() for y in _flat(v)]
    if isinstance(value, list):
        return [y for v in value for y in _flat(v)]
    return [value]


# ----------------------------------------------------------------------------- over HTTP
def _post(url: str, raw: bytes) -> tuple[int, dict]:
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    conn.request("POST", "/v1/chat/completions", body=raw, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    return resp.status, json.loads(resp.read())


def _body(**extra) -> bytes:
    return json.dumps({"model": MODEL, "messages": [user("q")], **extra}).encode()


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (_body()[:-1] + b', "repetition_penalty": Infinity}', "Infinity"),
        (_body()[:-1] + b', "temperature": NaN}', "NaN"),
        (_body()[:-1] + b', "top_p": -Infinity}', "-Infinity"),
        (_body()[:-1] + b', "repetition_penalty": 1e999}', "finite"),
        (_body()[:-1] + b', "max_tokens": ' + b"9" * 5000 + b"}", "number"),
        (_body(budgets=[2**63, 1, 1, 1]), "budget 9223372036854775808 is larger than the largest accepted"),
        (_body(budgets=f"{2**63},1,1,1"), "budget 9223372036854775808 is larger than the largest accepted"),
    ],
)
def test_non_json_numbers_and_huge_integers_are_400_not_500(raw, needle) -> None:
    with server() as (client, fake, url):
        status, body = _post(url, raw)
        assert status == 400, body
        err = body["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
        assert needle in err["message"], err
        assert fake.calls == []  # nothing reached the model
        assert client.chat.completions.create(model=MODEL, messages=[user("q")]).choices[0].message.content


def _png(w: int, h: int, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.frombytes("RGB", (w, h), random.Random(seed).randbytes(w * h * 3)).save(buf, format="PNG")
    return buf.getvalue()


def test_a_spooled_data_url_is_the_same_image_also_with_escaped_slashes() -> None:
    big = _png(300, 200)  # ~180 KB: spooled (> 64 KiB)
    assert len(big) > 100_000
    with server() as (client, fake, url):
        r = client.chat.completions.create(model=MODEL, messages=[user("How many fields?", data_url(big))])
        assert r.model_extra["uhrbat"]["image_size"] == [300, 200]
        raw = json.dumps({"model": MODEL, "messages": [user("How many roads?", data_url(big))]}).replace("/", "\\/")
        status, body = _post(url, raw.encode())
        assert status == 200, body
        assert body["uhrbat"]["image_size"] == [300, 200]
        assert body["uhrbat"]["cache"] == "hit"  # the same bytes: the scene cache recognised them
        bad = data_url(big)[:-10] + "-_-_-_-_-_"  # URL-safe base64 is not what data: URLs carry
        with pytest.raises(openai.BadRequestError, match="not valid base64") as e:
            client.chat.completions.create(model=MODEL, messages=[user("q", bad)])
        assert e.value.body["param"] == "messages.0.content.0.image_url"
    assert [c["size"] for c in fake.calls] == [(300, 200), (300, 200)]


def test_a_big_data_url_anywhere_but_an_image_part_is_400() -> None:
    msg = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(_png(8, 8))}}]}
    msg["content"].append({"type": "text", "text": data_url(_png(300, 200))})
    with server() as (_, fake, url):
        status, body = _post(url, json.dumps({"model": MODEL, "messages": [msg]}).encode())
    assert status == 400 and body["error"]["param"] == "messages.0.content.1.text", body
    assert "only accepted as an image_url" in body["error"]["message"] and fake.calls == []


def test_the_body_is_parsed_off_the_event_loop_and_never_held_whole(monkeypatch) -> None:
    """Before: `json.loads(await request.body())` on the event loop held the body twice (bytes
    and str) plus the decoded image: 40+ MB for this 16 MB body. Now the peak of Python
    allocations until the job is queued stays a few MiB (the pieces in hand), and no piece is
    parsed on a thread running the event loop."""
    import asyncio

    from uhrbat.serving import engine as engine_mod

    threads = []
    real_feed = JsonBodyReader.feed

    def feed(self, data):
        try:
            asyncio.get_running_loop()
            threads.append("event loop")
        except RuntimeError:
            threads.append(threading.current_thread().name)
        return real_feed(self, data)

    peaks = []
    real_submit = engine_mod.Engine.submit

    def submit(self, job):
        peaks.append(tracemalloc.get_traced_memory()[1])
        return real_submit(self, job)

    monkeypatch.setattr(JsonBodyReader, "feed", feed)
    monkeypatch.setattr(engine_mod.Engine, "submit", submit)
    payload = b"\x89PNG\r\n\x1a\n" + random.Random(3).randbytes(12_000_000)  # decoding fails later: a 400
    raw = json.dumps({"model": MODEL, "messages": [user("q", data_url(payload))]}).encode()
    with server() as (_, _fake, url):
        tracemalloc.start()
        try:
            status, body = _post(url, raw)
        finally:
            tracemalloc.stop()
    assert status == 400 and "upload.png" in body["error"]["message"], body
    assert threads and "event loop" not in threads
    assert len(raw) > 16_000_000 and len(peaks) == 1 and peaks[0] < 4 * 2**20, peaks
