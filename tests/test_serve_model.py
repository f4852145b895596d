"""`uhrbat serve` with the real (tiny, random) model behind the real `openai` client: answers
equal direct pipeline calls, streaming equals non-streaming, micro-batched concurrent clients
equal single requests, follow-up questions hit the scene cache."""

from __future__ import annotations

import base64
import contextlib
import io
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from uhrbat.serving import ChatService, ServeOptions, create_app, serve_in_thread

MODEL = "tiny"
GEN = {"max_tokens": 6}


def scene_png(seed: int = 0, w: int = 160, h: int = 120) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def image_part(data: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(data).decode()}}


def turn(question: str, data: bytes | None = None) -> dict:
    content = ([image_part(data)] if data is not None else []) + [{"type": "text", "text": question}]
    return {"role": "user", "content": content}


@contextlib.contextmanager
def server(pipe, **options):
    opts = ServeOptions(model_name=MODEL, **{"batch_wait_s": 0.05, **options})
    with serve_in_thread(create_app(ChatService(pipe, opts)), opts) as url:
        yield openai.OpenAI(base_url=url + "v1", api_key="none", max_retries=0, timeout=120)


def direct(pipe, data: bytes, messages: list[dict], max_new_tokens: int = GEN["max_tokens"], **kw) -> str:
    """The same question asked of the pipeline directly (pipeline message format)."""
    from uhrbat.io import open_image_bytes

    conv = []
    for m in messages:
        if isinstance(m["content"], str):
            conv.append(m)
        else:
            conv.append(
                {
                    "role": m["role"],
                    "content": [{"type": "image"} if p["type"] == "image_url" else p for p in m["content"]],
                }
            )
    return pipe.chat(open_image_bytes(data, filename="x.png"), conv, max_new_tokens=max_new_tokens, **kw).answer


def test_answers_streaming_and_usage_match_the_pipeline(tiny_pipeline) -> None:
    data = scene_png(1)
    msgs = [turn("How many trees are there?", data)]
    with server(tiny_pipeline) as client:
        r = client.chat.completions.create(model=MODEL, messages=msgs, **GEN)
        chunks = list(
            client.chat.completions.create(
                model=MODEL, messages=msgs, stream=True, stream_options={"include_usage": True}, **GEN
            )
        )
    expected = direct(tiny_pipeline, data, msgs)
    assert r.choices[0].message.content == expected
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert 0 < r.usage.completion_tokens <= GEN["max_tokens"] and r.usage.prompt_tokens > 16
    assert chunks[-1].usage.model_dump() == r.usage.model_dump()
    ext = r.model_extra["uhrbat"]
    assert ext["image_size"] == [160, 120] and ext["num_visual_tokens"] <= 8 + 16


def test_follow_up_question_hits_the_scene_cache(tiny_pipeline) -> None:
    data = scene_png(2)
    with server(tiny_pipeline) as client:
        first = client.chat.completions.create(model=MODEL, messages=[turn("Is there a road?", data)], **GEN)
        convo = [
            turn("Is there a road?", data),
            {"role": "assistant", "content": first.choices[0].message.content},
            turn("Which way does it run?"),
        ]
        second = client.chat.completions.create(
            model=MODEL, messages=convo, extra_body={"return_tokens": True, "budgets": [4, 6]}, **GEN
        )
    assert first.model_extra["uhrbat"]["cache"] == "miss"
    assert second.model_extra["uhrbat"]["cache"] == "hit"
    assert first.model_extra["uhrbat"]["timings"]["tiles"] > 0
    assert second.model_extra["uhrbat"]["timings"]["tiles"] == 0.0  # the resent bytes were recognised: no re-tiling
    assert second.choices[0].message.content == direct(tiny_pipeline, data, convo, budgets=[4, 6])
    tokens = second.model_extra["uhrbat"]["tokens"]
    assert len(tokens) == second.model_extra["uhrbat"]["num_visual_tokens"] <= 4 + 6
    assert all(t["box_px"] is None or len(t["box_px"]) == 4 for t in tokens)
    assert second.usage.prompt_tokens > first.usage.prompt_tokens  # the earlier turns are in the prompt


def test_concurrent_clients_equal_single_requests(tiny_pipeline) -> None:
    # 8 distinct (image, question) requests, each sent by two of the 16 clients
    images = [scene_png(10 + i % 4, 96, 64) for i in range(16)]
    questions = [f"What is in part {i % 8} of the scene?" for i in range(16)]
    with server(tiny_pipeline, max_batch=8) as client:

        def ask(i: int) -> tuple[str, int]:
            r = client.chat.completions.create(model=MODEL, messages=[turn(questions[i], images[i])], max_tokens=3)
            return r.choices[0].message.content, r.model_extra["uhrbat"]["batch_size"]

        with ThreadPoolExecutor(16) as pool:
            got = list(pool.map(ask, range(16)))
    single = [direct(tiny_pipeline, images[i], [turn(questions[i], images[i])], 3) for i in range(8)]
    assert [a for a, _ in got] == single + single
    assert max(b for _, b in got) > 1  # they were really micro-batched


def test_sampling_with_a_seed_is_reproducible_and_runs_alone(tiny_pipeline) -> None:
    data = scene_png(3)
    kw = {
        "model": MODEL,
        "messages": [turn("Describe the scene.", data)],
        "max_tokens": 8,
        "temperature": 1.5,
        "top_p": 0.95,
    }
    with server(tiny_pipeline) as client:
        with ThreadPoolExecutor(2) as pool:
            a, b = pool.map(lambda _: client.chat.completions.create(seed=11, **kw), range(2))
        others = {client.chat.completions.create(seed=s, **kw).choices[0].message.content for s in range(12, 16)}
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.model_extra["uhrbat"]["batch_size"] == b.model_extra["uhrbat"]["batch_size"] == 1
    assert len(others | {a.choices[0].message.content}) > 1  # it really samples


def test_chat_service_answers_python_callers_like_the_pipeline(tiny_pipeline, tmp_path) -> None:
    """The service behind the routes also serves trusted Python callers (batch's local engine):
    a local image, checked options, the same answer as the pipeline's own `chat`."""
    from uhrbat.serving import ChatInput, ImageRef, RawOptions

    path = tmp_path / "scene.png"
    path.write_bytes(scene_png(4))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Where are the trees?"}]}]
    service = ChatService(tiny_pipeline, ServeOptions()).start()
    try:
        done = service.answer(
            ChatInput(messages, ImageRef(local=str(path)), RawOptions(max_new_tokens=6, budgets=[4, 6]))
        )
        with pytest.raises(Exception, match="exceeds this server's limit of 512"):
            service.answer(ChatInput(messages, ImageRef(local=str(path)), RawOptions(max_new_tokens=513)))
    finally:
        service.close()
    assert done.text == tiny_pipeline.chat(str(path), messages, max_new_tokens=6, budgets=[4, 6]).answer
    assert done.result.image_size == (160, 120) and done.result.num_visual_tokens <= 4 + 6


def test_the_real_pipeline_stops_at_a_stage_boundary_past_the_deadline(tiny_pipeline, monkeypatch) -> None:
    """The deadline reaches inside the real pipeline through its `progress=` callback: a request
    whose time ran out before the pipeline started is answered 504 and the pipeline run stops at
    its first stage boundary instead of running K-Means and generation; the server goes on."""
    from uhrbat.serving.engine import BatchAbandoned

    real, outcome = tiny_pipeline.chat_batch, []

    def late(*a, **k):
        time.sleep(2.5)  # the request's 2 s run out before the pipeline starts
        try:
            real(*a, **k)
            outcome.append("finished")
        except BatchAbandoned as e:
            outcome.append(f"stopped at {e}")
            raise

    monkeypatch.setattr(tiny_pipeline, "chat_batch", late)
    with server(tiny_pipeline, request_timeout_s=2.0) as client:
        with pytest.raises(openai.APIStatusError) as e:
            client.chat.completions.create(model=MODEL, messages=[turn("Trees?", scene_png(5))], **GEN)
        deadline = time.time() + 30
        while not outcome and time.time() < deadline:
            time.sleep(0.05)
    assert e.value.status_code == 504 and e.value.body["code"] == "timeout"
    assert outcome == ["stopped at load"]
    monkeypatch.undo()
    with server(tiny_pipeline) as client:
        r = client.chat.completions.create(model=MODEL, messages=[turn("Trees?", scene_png(5))], **GEN)
    assert r.choices[0].message.content == direct(tiny_pipeline, scene_png(5), [turn("Trees?", scene_png(5))])
