"""`uhrbat serve`'s OpenAI-compatible API, driven by the real `openai` client over loopback, with
the deterministic fake pipeline of `serving_fake` (queue, batching, streaming, errors, limits,
cancellation)."""

from __future__ import annotations

import base64
import contextlib
import http.client
import io
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import pytest
from PIL import Image

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from serving_fake import FakePipeline
from uhrbat.serving import ChatService, ServeOptions, create_app, serve_in_thread
from uhrbat.serving.engine import Engine

MODEL = "uhrbat-test"


def png_bytes(w: int = 120, h: int = 80, color=(90, 140, 60)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64," + base64.b64encode(data).decode()


def user(question: str, url: str | None = None) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": url or data_url(png_bytes())}}] if url != "" else []
    return {"role": "user", "content": parts + [{"type": "text", "text": question}]}


@contextlib.contextmanager
def server(
    fake: FakePipeline | None = None, *, max_batch: int = 8, max_queue: int = 64, batch_wait_s: float = 0.02, **options
):
    fake = fake or FakePipeline()
    engine = {"max_batch": max_batch, "max_queue": max_queue, "batch_wait_s": batch_wait_s}
    opts = ServeOptions(model_name=MODEL, **engine, **options)
    with serve_in_thread(create_app(ChatService(fake, opts)), opts) as url:
        key = opts.api_keys[0] if opts.api_keys else "none"
        client = openai.OpenAI(base_url=url + "v1", api_key=key, max_retries=0, timeout=30)
        yield client, fake, url


def test_models_health_and_metrics() -> None:
    with server() as (client, _, url):
        assert [m.id for m in client.models.list().data] == [MODEL]
        health = json.loads(_get_text(url + "health"))
        assert health["status"] == "ok" and health["model_loaded"] is True
        client.chat.completions.create(model=MODEL, messages=[user("How many fields?")], max_tokens=40)
        metrics = _get_text(url + "metrics")
    assert 'uhrbat_requests_total{route="/v1/chat/completions",status="200"} 1.0' in metrics
    assert 'uhrbat_scene_cache_total{result="miss"} 1.0' in metrics
    assert "uhrbat_queue_depth" in metrics and 'uhrbat_stage_seconds_count{stage="queue"} 1.0' in metrics


def _get_text(url: str, headers: dict | None = None) -> str:
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    conn.request("GET", u.path, headers=headers or {})
    return conn.getresponse().read().decode()


def test_non_streamed_answer_usage_and_extension() -> None:
    with server() as (client, fake, _):
        r = client.chat.completions.create(model=MODEL, messages=[user("How many fields are there?")])
    assert r.choices[0].message.content == FakePipeline.answer_for("How many fields are there?")
    assert r.choices[0].finish_reason == "stop" and r.object == "chat.completion"
    assert r.usage.completion_tokens == len(r.choices[0].message.content)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens > 0
    ext = r.model_extra["uhrbat"]
    assert ext["cache"] == "miss" and ext["image_size"] == [120, 80] and "tokens" not in ext
    assert fake.calls[-1]["size"] == (120, 80) and fake.calls[-1]["max_new_tokens"] == 512


def test_streamed_deltas_equal_the_answer_with_usage() -> None:
    q = "Is there a river next to the road?"
    with server() as (client, _, _url):
        stream = client.chat.completions.create(
            model=MODEL, messages=[user(q)], stream=True, stream_options={"include_usage": True}
        )
        chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == FakePipeline.answer_for(q)
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 3  # really incremental
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(text)


def test_extra_body_reaches_the_pipeline_and_tokens_come_back() -> None:
    with server() as (client, fake, _):
        r = client.chat.completions.create(
            model=MODEL,
            messages=[user("Where are the trees?")],
            max_completion_tokens=100,
            seed=7,
            extra_body={
                "budgets": [2, 3, 4, 5],
                "selector": "topk",
                "kmeans_clusters": 3,
                "kmeans_iters": 2,
                "kmeans_mode": "exact",
                "repetition_penalty": 1.2,
                "return_tokens": True,
            },
        )
    call = fake.calls[-1]
    assert call["budgets"] == [2, 3, 4, 5] and call["selector"] == "topk" and call["kmeans_clusters"] == 3
    assert call["kmeans_iters"] == 2 and call["seed"] == 7 and call["repetition_penalty"] == 1.2
    assert call["kmeans_mode"] == "exact"
    assert call["max_new_tokens"] == 100
    tokens = r.model_extra["uhrbat"]["tokens"]
    assert len(tokens) == 1 + 2 + 3 + 4 + 4  # fake: budget-1 kept + 1 merged per scale
    assert all(len(t["box_px"]) == 4 for t in tokens if t["box_px"] is not None)
    assert "geojson" not in r.model_extra["uhrbat"]  # not georeferenced


def test_geotiff_tokens_come_with_wgs84_geojson_naming_the_client_file(tmp_path) -> None:
    pytest.importorskip("rasterio")
    tif = Path(__file__).resolve().parents[1].parent / "shared" / "assets" / "aerial" / "neon_osbs_400.tif"
    (tmp_path / "scene.tif").write_bytes(tif.read_bytes())
    with server(allowed_local_media_path=str(tmp_path)) as (client, _, _url):
        r = client.chat.completions.create(
            model=MODEL,
            messages=[user("Trees?", (tmp_path / "scene.tif").as_uri())],
            extra_body={"return_tokens": True},
        )
    gj = r.model_extra["uhrbat"]["geojson"]
    assert gj["coordinate_space"] == "wgs84" and gj["image"]["path"] == "scene.tif"
    lon, lat = gj["features"][0]["geometry"]["coordinates"][0][0]
    assert -82.1 < lon < -81.9 and 29.6 < lat < 29.8


def test_stop_strings_and_max_tokens() -> None:
    q = "one two three"  # fake answer: "Fake answer: 3 words asked."
    with server() as (client, _, _url):
        r = client.chat.completions.create(model=MODEL, messages=[user(q)], stop=[" words"])
        assert (r.choices[0].message.content, r.choices[0].finish_reason) == ("Fake answer: 3", "stop")
        r = client.chat.completions.create(model=MODEL, messages=[user(q)], max_tokens=6)
        assert (r.choices[0].message.content, r.choices[0].finish_reason) == ("Fake a", "length")
        stream = client.chat.completions.create(model=MODEL, messages=[user(q)], stop="3 w", stream=True)
        streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        r = client.chat.completions.create(model=MODEL, messages=[user(q)], stop="3 w")
        assert streamed == r.choices[0].message.content == "Fake answer: "


def test_multi_turn_uses_the_earlier_turns_and_the_scene_cache() -> None:
    img = data_url(png_bytes(64, 64))
    with server() as (client, fake, _):
        first = client.chat.completions.create(model=MODEL, messages=[user("How many roofs?", img)])
        msgs = [
            user("How many roofs?", img),
            {"role": "assistant", "content": first.choices[0].message.content},
            {"role": "user", "content": "And how many are red?"},
        ]
        second = client.chat.completions.create(model=MODEL, messages=msgs)
    assert first.model_extra["uhrbat"]["cache"] == "miss" and second.model_extra["uhrbat"]["cache"] == "hit"
    assert fake.calls[-1]["turns"] == 3 and fake.calls[-1]["question"] == "And how many are red?"


@pytest.mark.parametrize(
    "messages, extra, needle",
    [
        ([user("q", data_url(b"\x89PNG\r\n\x1a\n corrupt"))], {}, "messages.0.content.0.image_url"),
        ([user("q", "")], {}, "exactly one image"),
        (
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": data_url(png_bytes())}},
                        {"type": "image_url", "image_url": {"url": data_url(png_bytes())}},
                    ],
                }
            ],
            {},
            "2 images",
        ),
        ([user("q", "https://example.com/a.png")], {}, "does not fetch remote URLs"),
        ([user("q", "file:///etc/passwd")], {}, "--allowed-local-media-path"),
        ([user("q", "data:image/png;base64,@@@")], {}, "not valid base64"),
        ([user("q", "data:text/html;base64,PGh0bWw+")], {}, "not an accepted image type"),
        ([user("q")], {"budgets": [1, 2]}, "4 scales"),
        ([user("q")], {"budget": [1, 2, 3, 4]}, "budget: unknown field"),
        ([user("q")], {"n": 2}, "n > 1"),
        ([user("q")], {"max_tokens": 513}, "limit of 512"),
        ([user("q")], {"selector": "nearest"}, "selector"),
        ([user("q"), {"role": "assistant", "content": "a"}], {}, "last message"),
    ],
)
def test_bad_requests_are_400_in_openai_schema(messages, extra, needle) -> None:
    with server() as (client, _, _url):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=messages, extra_body=extra)
        err = e.value.body
        assert needle in err["message"] and set(err) == {"message", "type", "param", "code"}
        assert err["type"] == "invalid_request_error" and "/tmp" not in err["message"]
        # the server is still healthy and answers the next request
        ok = client.chat.completions.create(model=MODEL, messages=[user("q")])
        assert ok.choices[0].message.content


def test_invalid_json_and_unknown_model() -> None:
    with server() as (client, _, url):
        with pytest.raises(openai.NotFoundError) as e:
            client.chat.completions.create(model="gpt-4o", messages=[user("q")])
        assert e.value.body["code"] == "model_not_found"
        u = urlparse(url)
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
        conn.request("POST", "/v1/chat/completions", body=b"{not json", headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 400 and "not valid JSON" in json.loads(resp.read())["error"]["message"]


def test_file_urls_only_inside_the_allowed_root(tmp_path) -> None:
    root, outside = tmp_path / "media", tmp_path / "private"
    root.mkdir()
    outside.mkdir()
    (root / "a.png").write_bytes(png_bytes(30, 20))
    (outside / "secret.png").write_bytes(png_bytes(31, 21))
    os.symlink(outside / "secret.png", root / "link.png")
    with server(allowed_local_media_path=str(root)) as (client, fake, _):
        r = client.chat.completions.create(model=MODEL, messages=[user("q", (root / "a.png").as_uri())])
        assert r.model_extra["uhrbat"]["image_size"] == [30, 20]
        for url in (
            (root / "link.png").as_uri(),
            f"file://{root}/../private/secret.png",
            (outside / "secret.png").as_uri(),
            (outside / "missing.png").as_uri(),
        ):
            with pytest.raises(openai.BadRequestError, match="outside the allowed local media path"):
                client.chat.completions.create(model=MODEL, messages=[user("q", url)])
        with pytest.raises(openai.BadRequestError, match="cannot open"):
            client.chat.completions.create(model=MODEL, messages=[user("q", (root / "nope.png").as_uri())])
        os.mkfifo(root / "fifo.png")  # would block a reader forever
        with pytest.raises(openai.BadRequestError, match="not a regular file"):
            client.chat.completions.create(model=MODEL, messages=[user("q", (root / "fifo.png").as_uri())])
    assert [c["size"] for c in fake.calls] == [(30, 20)]  # nothing outside the root was ever read


def test_oversized_requests_get_413_before_the_body_is_read() -> None:
    big = data_url(os.urandom(200_000))
    with server(max_request_bytes=100_000) as (client, _, url):
        with pytest.raises(openai.APIStatusError) as e:
            client.chat.completions.create(model=MODEL, messages=[user("q", big)])
        assert e.value.status_code == 413 and e.value.body["code"] == "request_too_large"
        # without Content-Length (chunked upload) the limit holds while reading
        u = urlparse(url)
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
        body = json.dumps({"model": MODEL, "messages": [user("q", big)]}).encode()
        conn.request(
            "POST",
            "/v1/chat/completions",
            body=iter([body[i : i + 16384] for i in range(0, len(body), 16384)]),
            headers={"Content-Type": "application/json"},
            encode_chunked=True,
        )
        resp = conn.getresponse()
        assert resp.status == 413 and json.loads(resp.read())["error"]["code"] == "request_too_large"
        assert client.chat.completions.create(model=MODEL, messages=[user("q")]).choices[0].message.content


def test_api_key(monkeypatch) -> None:
    with server(api_keys=("s3cret",)) as (client, _, url):
        assert client.chat.completions.create(model=MODEL, messages=[user("q")]).choices[0].message.content
        bad = openai.OpenAI(base_url=url + "v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as e:
            bad.chat.completions.create(model=MODEL, messages=[user("q")])
        assert e.value.body["type"] == "authentication_error"
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        assert json.loads(_get_text(url + "health"))["status"] == "ok"  # health stays open for probes


def test_concurrent_clients_are_micro_batched_and_get_their_own_answers() -> None:
    questions = [" ".join(["w"] * (i + 1)) for i in range(16)]
    with server(max_batch=8, batch_wait_s=0.2) as (client, fake, _):

        def ask(q: str) -> str:
            return client.chat.completions.create(model=MODEL, messages=[user(q)]).choices[0].message.content

        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(ask, questions))
    assert answers == [FakePipeline.answer_for(q) for q in questions]
    assert max(fake.batches) > 1 and max(fake.batches) <= 8 and sum(fake.batches) == 16


def test_full_queue_answers_503_with_retry_after() -> None:
    slow = FakePipeline(step_delay=0.02, answer_fn=lambda q: "x" * 400)
    with server(slow, max_batch=1, max_queue=1, batch_wait_s=0) as (client, _, url), ThreadPoolExecutor(2) as pool:
        running = pool.submit(client.chat.completions.create, model=MODEL, messages=[user("a")], max_tokens=60)
        _wait(lambda: slow.batches)  # the first request is on the model
        queued = pool.submit(client.chat.completions.create, model=MODEL, messages=[user("b")], max_tokens=60)
        _wait(lambda: json.loads(_get_text(url + "health"))["queue_depth"] == 1)
        with pytest.raises(openai.InternalServerError) as e:
            client.chat.completions.create(model=MODEL, messages=[user("c")])
        assert e.value.status_code == 503 and e.value.response.headers["retry-after"].isdigit()
        assert e.value.body["code"] == "overloaded"
        assert running.result().choices[0].message.content == "x" * 60
        assert queued.result().choices[0].message.content == "x" * 60


def _wait(cond, timeout: float = 10) -> None:
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, "condition not reached"
        time.sleep(0.01)


def test_disconnect_mid_stream_stops_generation() -> None:
    slow = FakePipeline(step_delay=0.01, answer_fn=lambda q: "y" * 3000)
    with server(slow, max_new_tokens=3000) as (client, _, _url):
        stream = client.chat.completions.create(model=MODEL, messages=[user("q")], stream=True, max_tokens=3000)
        got = ""
        for chunk in stream:
            got += chunk.choices[0].delta.content or ""
            if len(got) >= 20:
                break
        stream.close()  # the client goes away mid-answer
        _wait(lambda: slow.last is not None, timeout=20)  # generation ended ...
        assert slow.last.completion_tokens < 1000  # ... long before its 3000 tokens (30 s)
        r = client.chat.completions.create(model=MODEL, messages=[user("next")], max_tokens=5)
        assert r.choices[0].message.content == "yyyyy"


def test_engine_survives_a_pipeline_crash() -> None:
    fake = FakePipeline()
    calls = {"n": 0}
    real = fake.chat_batch

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("out of memory on the fake GPU")
        return real(*a, **k)

    fake.chat_batch = flaky  # type: ignore[method-assign]
    with server(fake) as (client, _, _url):
        with pytest.raises(openai.InternalServerError) as e:
            client.chat.completions.create(model=MODEL, messages=[user("q")])
        assert e.value.status_code == 500 and "out of memory" in e.value.body["message"]
        assert client.chat.completions.create(model=MODEL, messages=[user("q")]).choices[0].message.content


def test_lazy_pipeline_factory_runs_once_under_concurrency() -> None:
    made = []
    lock = threading.Lock()

    def factory():
        time.sleep(0.2)
        with lock:
            made.append(1)
        return FakePipeline()

    engine = Engine(pipeline_factory=factory)
    with ThreadPoolExecutor(8) as pool:
        pipes = list(pool.map(lambda _: engine.pipeline(), range(8)))
    assert made == [1] and all(p is pipes[0] for p in pipes)


def test_disconnect_while_waiting_for_a_plain_answer_stops_generation() -> None:
    slow = FakePipeline(step_delay=0.01, answer_fn=lambda q: "z" * 3000)
    with server(slow, max_new_tokens=3000) as (client, _, url):
        u = urlparse(url)
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
        body = json.dumps({"model": MODEL, "messages": [user("q")], "max_tokens": 3000})
        conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
        _wait(lambda: slow.batches)  # generation has started ...
        conn.sock.shutdown(2)  # ... and the client goes away without reading the answer
        conn.close()
        _wait(lambda: slow.last is not None, timeout=20)
        assert slow.last.completion_tokens < 1000  # stopped long before its 3000 tokens (30 s)
        assert (
            client.chat.completions.create(model=MODEL, messages=[user("q")], max_tokens=3).choices[0].message.content
        )


def test_no_test_double_ships_in_the_package() -> None:
    """The fake pipeline lives in tests/ and product code never asks whether it talks to one."""
    import uhrbat

    src = Path(uhrbat.__file__).parent
    assert not (src / "serving" / "fake.py").exists()
    offenders = [
        p.name for p in src.rglob("*.py") if "FakePipeline" in p.read_text() or "serving.fake" in p.read_text()
    ]
    assert offenders == []
