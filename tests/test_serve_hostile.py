"""Hostile requests found by driving `uhrbat serve` as a stranger would (QA pass): wrong JSON
types, out-of-range seeds, union fields with one clear message, 413s counted in `/metrics`.
Uses the deterministic fake pipeline from `test_serve_api`."""

from __future__ import annotations

import http.client
import json
import os
from urllib.parse import urlparse

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from test_serve_api import MODEL, _get_text, data_url, server, user  # noqa: E402


def _post(url: str, body: dict | bytes) -> tuple[int, dict]:
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=20)
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request("POST", "/v1/chat/completions", body=raw, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    return resp.status, json.loads(resp.read())


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", True),  # was read as max_tokens=1
        ("return_tokens", "yes"),  # was read as True
        ("stream", "yes"),  # was answered as a stream
        ("temperature", "1"),  # was read as 1.0
        ("seed", 1.0),
    ],
)
def test_wrong_json_types_are_400_never_coerced(field, value) -> None:
    with server() as (client, fake, url):
        status, body = _post(url, {"model": MODEL, "messages": [user("q")], field: value})
        assert status == 400, body
        assert body["error"]["param"] == field and body["error"]["type"] == "invalid_request_error"
        assert fake.calls == []  # nothing reached the model
        assert client.chat.completions.create(model=MODEL, messages=[user("q")]).choices[0].message.content


def test_seed_outside_int64_is_400_not_a_500() -> None:
    # torch.manual_seed / Generator.manual_seed overflow above 2**64; OpenAI's seed is an int64
    with server() as (client, _, url):
        for seed in (2**70, -(2**70)):
            with pytest.raises(openai.BadRequestError) as e:
                client.chat.completions.create(model=MODEL, messages=[user("q")], seed=seed, temperature=1.0)
            assert e.value.body["param"] == "seed"
        ok = client.chat.completions.create(model=MODEL, messages=[user("q")], seed=2**63 - 1, temperature=1.0)
        assert ok.choices[0].message.content


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ([{"type": "text"}], "messages.0.content.0.text: Field required"),
        ([{"type": "image_url", "image_url": "data:"}], "messages.0.content.0.image_url: Input should be a valid"),
        (5, "messages.0.content: Input should be a valid string or a valid list"),
    ],
)
def test_a_bad_content_part_gets_one_message_naming_the_real_problem(content, message) -> None:
    # `content` is `str | list[part]`: pydantic fails once per union member; the answer used to be
    # "messages.0.content.str: Input should be a valid string (and 1 more problem)" for all three
    with server() as (_, _fake, url):
        status, body = _post(url, {"model": MODEL, "messages": [{"role": "user", "content": content}]})
    assert status == 400
    assert body["error"]["message"].startswith(message), body
    assert "more problem" not in body["error"]["message"] and ".str" not in body["error"]["param"]


def test_413_by_content_length_is_counted_as_an_error() -> None:
    with server(max_request_bytes=50_000) as (client, _, url):
        with pytest.raises(openai.APIStatusError) as e:
            client.chat.completions.create(model=MODEL, messages=[user("q", data_url(os.urandom(100_000)))])
        assert e.value.status_code == 413
        metrics = _get_text(url + "metrics")
    assert 'uhrbat_requests_total{route="/v1/chat/completions",status="413"} 1.0' in metrics
    assert 'uhrbat_errors_total{type="invalid_request_error"} 1.0' in metrics


@pytest.mark.parametrize("path", ["%00x.png", "a%0a.png", "\ud800.png"])
def test_file_url_with_a_nul_or_surrogate_is_400_not_a_500(tmp_path, path) -> None:
    with server(allowed_local_media_path=str(tmp_path)) as (client, _, url):
        raw = json.dumps({"model": MODEL, "messages": [user("q", f"file://{tmp_path}/{path}")]}).encode()
        status, body = _post(url, raw)  # json.dumps escapes the lone surrogate as "\ud800"
        assert status == 400, body
        assert "not a valid local path" in body["error"]["message"]
        assert client.chat.completions.create(model=MODEL, messages=[user("q")]).choices[0].message.content


def test_deeply_nested_json_is_400_not_a_500() -> None:
    with server() as (_, _fake, url):
        status, body = _post(url, b"[" * 100_000 + b"]" * 100_000)
    assert status == 400 and "nested too deeply" in body["error"]["message"]


def test_demo_413_names_the_demo_flag() -> None:
    # the demo's limit is --max-upload-mb; its 413 used to name `uhrbat serve`'s --max-request-mb
    from fastapi.testclient import TestClient

    from serving_fake import FakePipeline
    from uhrbat.serving import ChatService
    from uhrbat.serving.demo import create_app, demo_options

    with TestClient(create_app(ChatService(FakePipeline(), demo_options(max_upload_mb=0.01)))) as client:
        r = client.post("/api/ask", files={"image": ("a.png", os.urandom(20_000))}, data={"question": "q"})
    assert r.status_code == 413
    assert "--max-upload-mb" in r.json()["error"]["message"]


@pytest.mark.parametrize("content", ["hi \ud800 there", [{"type": "text", "text": "\udfff"}]])
def test_lone_surrogate_in_the_text_is_400_not_a_500(content) -> None:
    # JSON may escape a lone surrogate ("\ud800"); the real tokenizer raised TypeError -> 500
    msgs = [user("q"), {"role": "assistant", "content": "a"}, {"role": "user", "content": content}]
    with server() as (client, fake, url):
        status, body = _post(url, json.dumps({"model": MODEL, "messages": msgs}).encode())
        assert status == 400, body
        assert body["error"]["param"].startswith("messages.2.content") and "surrogate" in body["error"]["message"]
        assert fake.calls == []


@pytest.mark.parametrize(
    ("field", "value", "flag"), [("kmeans_clusters", 10**9, "--max-clusters"), ("kmeans_iters", 101, "--max-iters")]
)
def test_kmeans_work_a_client_asks_for_is_bounded(field, value, flag) -> None:
    # 10**9 clusters is clamped to every token (82,944 at 4032 px): one such request held the worker for minutes
    with server(max_kmeans_clusters=600, max_kmeans_work=10**12) as (client, fake, _):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=[user("q")], extra_body={field: value})
        assert e.value.body["param"] == field and flag in e.value.body["message"]
        assert fake.calls == []  # refused before anything was queued
        ok = client.chat.completions.create(model=MODEL, messages=[user("q")], extra_body={"kmeans_clusters": 600})
        assert ok.choices[0].message.content
