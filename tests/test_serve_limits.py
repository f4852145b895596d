"""What one request (or one client) may cost the server (issue 18, items 4, 5 and 9), over real
sockets on loopback: bytes in flight (503 + Retry-After), stalled bodies (408), request heads that
trickle in (closed), a connection cap (503), aborted uploads (one log line), a per-request
deadline (504 naming the stage), the K-Means work limit (400 naming the flag), and slow image
decodes that never hold the model's thread."""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from serving_fake import FakePipeline  # noqa: E402
from test_serve_api import MODEL, _wait, data_url, png_bytes, server, user  # noqa: E402


def _conn(url: str, timeout: float = 20) -> http.client.HTTPConnection:
    u = urlparse(url)
    return http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)


def _raw_socket(url: str) -> socket.socket:
    u = urlparse(url)
    return socket.create_connection((u.hostname, u.port), timeout=20)


@contextlib.contextmanager
def captured_logs(*names: str):
    """Records of the named loggers (uvicorn's do not propagate to the root logger)."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(logging.DEBUG)
    loggers = [logging.getLogger(n) for n in names]
    old = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)
    try:
        yield records
    finally:
        for lg, level in zip(loggers, old):
            lg.removeHandler(handler)
            lg.setLevel(level)


# ----------------------------------------------------------------------------- bytes in flight
def test_bodies_beyond_the_in_flight_cap_get_503_with_retry_after_before_being_read() -> None:
    body = json.dumps({"model": MODEL, "messages": [user("q", data_url(os.urandom(150_000)))]}).encode()
    with server(max_request_bytes=1_000_000, max_inflight_bytes=250_000) as (client, _, url):
        holder = _raw_socket(url)  # announces 200,000 bytes and sends half: they stay reserved
        holder.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 200000\r\n\r\n" + b" " * 100_000
        )
        time.sleep(0.3)
        conn = _conn(url)
        conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        err = json.loads(resp.read())["error"]
        assert resp.status == 503 and resp.getheader("Retry-After") == "2"
        assert err["code"] == "overloaded" and "--max-inflight-mb" in err["message"]
        holder.close()  # the reservation is released with the request
        time.sleep(0.3)
        r = client.chat.completions.create(model=MODEL, messages=[user("q", data_url(png_bytes()))])
        assert r.choices[0].message.content


# ----------------------------------------------------------------------------- slow clients
def test_a_stalled_body_gets_408_after_the_read_timeout() -> None:
    with server(read_timeout_s=0.5) as (client, fake, url):
        s = _raw_socket(url)
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 1000\r\n\r\n{"model": '
        )
        t0 = time.monotonic()
        answer = b""
        while chunk := s.recv(65536):  # the server answers and closes the connection
            answer += chunk
        s.close()
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert time.monotonic() - t0 < 5 and b"--read-timeout" in answer
        assert fake.calls == []
        assert client.chat.completions.create(model=MODEL, messages=[user("q")]).choices[0].message.content


def test_a_request_head_that_trickles_in_is_cut_off() -> None:
    """uvicorn resets its keep-alive timer on every byte: without a head deadline, one byte every
    few seconds held a connection forever (Slowloris)."""
    with server(header_timeout_s=1.0) as (client, _, url):
        s = _raw_socket(url)
        t0 = time.monotonic()
        closed_after = None
        for byte in b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 40:
            try:
                s.sendall(bytes([byte]))
            except OSError:
                closed_after = time.monotonic() - t0
                break
            s.settimeout(0.2)
            try:
                if s.recv(1024) == b"":
                    closed_after = time.monotonic() - t0
                    break
            except TimeoutError:
                pass
        s.close()
        assert closed_after is not None and closed_after < 4, closed_after
        # a client that sends its request promptly is served, also on a kept-alive connection
        conn = _conn(url)
        for _ in range(2):
            conn.request("GET", "/health")
            assert conn.getresponse().read() and True
        assert client.models.list().data[0].id == MODEL


def test_connections_beyond_the_cap_get_503() -> None:
    with server(max_connections=2) as (_, _fake, url):
        idle = [_raw_socket(url) for _ in range(2)]
        time.sleep(0.2)
        conn = _conn(url)
        conn.request("GET", "/health")
        assert conn.getresponse().status == 503
        for s in idle:
            s.close()
        time.sleep(0.3)
        conn = _conn(url)
        conn.request("GET", "/health")
        assert conn.getresponse().status == 200


def test_an_aborted_upload_is_one_log_line_not_a_traceback() -> None:
    with server() as (client, fake, url), captured_logs("uhrbat", "uvicorn", "uvicorn.error") as records:
        s = _raw_socket(url)
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 500000\r\n\r\n" + b'{"model": "' + b"x" * 100_000
        )
        time.sleep(0.3)
        s.close()  # the client goes away mid-upload
        _wait(lambda: any("went away during the upload" in r.getMessage() for r in records))
        time.sleep(0.5)
        assert client.chat.completions.create(model=MODEL, messages=[user("q")]).choices[0].message.content
    lines = [r.getMessage() for r in records if r.levelno >= logging.INFO]
    assert [m for m in lines if "went away" in m] == [m for m in lines if "upload" in m]
    (line,) = [m for m in lines if "went away" in m]
    assert re.search(r"\(\d+ of 500000 bytes received\): POST /v1/chat/completions", line), line
    assert not any(r.exc_info for r in records), [r.getMessage() for r in records if r.exc_info]
    assert fake.calls[-1]["question"] == "q"


# ----------------------------------------------------------------------------- per-request work
def test_a_request_past_its_deadline_fails_with_504_naming_the_stage() -> None:
    slow = FakePipeline(stage_delay=0.4)  # each pipeline stage takes 0.4 s
    with server(slow, request_timeout_s=1.0) as (client, fake, _):
        with pytest.raises(openai.APIStatusError) as e:
            client.chat.completions.create(model=MODEL, messages=[user("q")])
        err = e.value.body
        assert e.value.status_code == 504 and err["code"] == "timeout" and err["type"] == "server_error"
        assert "--request-timeout" in err["message"] and "1 s" in err["message"]
        assert "'encode'" in err["message"] or "'score'" in err["message"], err["message"]
        assert fake.last is None  # the pipeline run was stopped at a stage boundary, not finished


def test_a_deadline_stops_generation_and_the_rest_of_the_batch_goes_on() -> None:
    slow = FakePipeline(step_delay=0.01, answer_fn=lambda q: "z" * 3000 if q == "long" else "short answer")
    with server(slow, request_timeout_s=4.0, max_new_tokens=3000, batch_wait_s=0.3) as (client, fake, _):
        with ThreadPoolExecutor(2) as pool:
            long = pool.submit(client.chat.completions.create, model=MODEL, messages=[user("long")], max_tokens=3000)
            short = pool.submit(client.chat.completions.create, model=MODEL, messages=[user("other")])
            assert short.result().choices[0].message.content == "short answer"
            with pytest.raises(openai.APIStatusError) as e:
                long.result()
        assert e.value.status_code == 504 and "'answering'" in e.value.body["message"]
        assert max(fake.batches) == 2  # they ran in one batch
        assert fake.last.completion_tokens < 1500  # stopped long before 3000 steps (30 s)


def _kmeans_work(scales, ks, iters):
    tokens = [(s // 336) ** 2 * 576 for s in scales]
    return sum(min(k, n) * n * iters for k, n in zip(ks, tokens))


def test_kmeans_work_is_estimated_and_refused_up_front() -> None:
    # Fake model: scales 672..4032, budgets 8,16,24,32, K-Means defaults K = budget, 10 iterations.
    scales = (672, 1344, 2688, 4032)
    default = _kmeans_work(scales, (8, 16, 24, 32), 10)
    with server() as (client, fake, _):
        ok = client.chat.completions.create(model=MODEL, messages=[user("q")], extra_body={"kmeans_iters": 10})
        assert ok.choices[0].message.content
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(
                model=MODEL, messages=[user("q")], extra_body={"kmeans_clusters": 100, "kmeans_iters": 20}
            )
        asked = _kmeans_work(scales, (100,) * 4, 20)
        msg = e.value.body["message"]
        assert f"{asked:,} cluster x token x iteration steps" in msg and f"limit of {default:,}" in msg
        assert "--max-kmeans-work" in msg and e.value.body["param"] == "kmeans_clusters"
        assert len(fake.calls) == 1  # refused before anything was queued
    with server(max_kmeans_work=asked) as (client, fake, _):
        r = client.chat.completions.create(
            model=MODEL, messages=[user("q")], extra_body={"kmeans_clusters": 100, "kmeans_iters": 20}
        )
        assert r.choices[0].message.content and fake.calls[-1]["kmeans_clusters"] == 100


def test_a_slow_image_decode_never_holds_the_model(tmp_path, monkeypatch) -> None:
    """Before: the model's worker thread decoded every image, so one slow decode held every
    request behind it. Now decodes run in their own threads; a second request is answered while
    the first is still decoding."""
    import uhrbat.io.sources
    from uhrbat.io import set_decode_concurrency

    (tmp_path / "slow.png").write_bytes(png_bytes(40, 30))
    (tmp_path / "fast.png").write_bytes(png_bytes(20, 10))
    release = threading.Event()
    real_open = uhrbat.io.sources.open_image

    def open_image(path, **kw):
        if str(path).endswith("slow.png"):
            assert release.wait(20)  # a decode that takes as long as the test wants
        return real_open(path, **kw)

    monkeypatch.setattr(uhrbat.io.sources, "open_image", open_image)
    set_decode_concurrency(2)
    try:
        with server(allowed_local_media_path=str(tmp_path)) as (client, fake, url), ThreadPoolExecutor(2) as pool:
            slow = pool.submit(
                client.chat.completions.create, model=MODEL, messages=[user("slow", (tmp_path / "slow.png").as_uri())]
            )
            time.sleep(0.3)
            fast = client.chat.completions.create(
                model=MODEL, messages=[user("fast", (tmp_path / "fast.png").as_uri())]
            )
            assert fast.model_extra["uhrbat"]["image_size"] == [20, 10] and not slow.done()
            release.set()
            assert slow.result().model_extra["uhrbat"]["image_size"] == [40, 30]
        assert [c["question"] for c in fake.calls] == ["fast", "slow"]
    finally:
        release.set()
        set_decode_concurrency(1)


def test_the_server_pixel_limit_is_far_below_the_library_default() -> None:
    """A few hundred bytes claiming 20,000 x 20,000 pixels (under the library's 1.5 GP) are refused
    from the header by the server's 256 MP default, before any pixel is decoded."""
    from untrusted_corpus import png_bytes as lying_png

    with server() as (client, fake, _):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(
                model=MODEL, messages=[user("q", data_url(lying_png(20_000, 20_000, rows=1)))]
            )
        msg = e.value.body["message"]
        assert "has 20000x20000 = 400,000,000 pixels, above the limit of 256,000,000" in msg, msg
        assert "--max-pixels" in msg
        assert fake.calls == []
