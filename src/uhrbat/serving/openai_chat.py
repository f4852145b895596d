"""`OpenAIServingChat`: the OpenAI chat-completions protocol on top of `ChatService` (vLLM's
`serving_chat.py` shape): a typed request in, a `ChatCompletion` or a server-sent-event stream
out. The routes (`serving.app`) only read the body, authenticate and hand over.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from uhrbat.serving.body import ParsedBody
from uhrbat.serving.chat_service import ChatInput, ChatService, ImageRef, RawOptions, RequestContext, api_error_of
from uhrbat.serving.engine import Completion
from uhrbat.serving.openai_api import (
    APIError,
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    Delta,
    ModelCard,
    ModelList,
    Usage,
)

log = logging.getLogger("uhrbat.serve")

Disconnected = Callable[[], Awaitable[bool]]


class OpenAIServingChat:
    """`POST /v1/chat/completions` and `GET /v1/models` for one served model name."""

    def __init__(self, service: ChatService, model_name: str) -> None:
        self.service = service
        self.model_name = model_name
        self.created = int(time.time())

    # ------------------------------------------------------------------ models
    def models(self) -> dict[str, Any]:
        return ModelList(data=[ModelCard(id=self.model_name, created=self.created)]).model_dump()

    # ------------------------------------------------------------------ request -> ChatInput
    def parse(self, body: ParsedBody) -> ChatCompletionRequest:
        """The typed request (strict pydantic validation; unknown fields are 400s)."""
        req = ChatCompletionRequest.model_validate(body.value)
        req.check_supported()
        if req.model != self.model_name:
            raise APIError(
                404,
                f"model {req.model!r} does not exist; this server serves {self.model_name!r}",
                param="model",
                code="model_not_found",
            )
        return req

    def chat_input(self, req: ChatCompletionRequest, body: ParsedBody) -> ChatInput:
        from uhrbat.serving.media import conversation

        messages, part, where = conversation(req.messages)
        options = RawOptions(
            max_new_tokens=req.max_completion_tokens or req.max_tokens,
            budgets=req.budgets,
            selector=req.selector,
            kmeans_clusters=req.kmeans_clusters,
            kmeans_iters=req.kmeans_iters,
            kmeans_mode=req.kmeans_mode,
            seed=req.seed,
            encode=req.encode,
            gate_margin=req.gate_margin,
            temperature=req.temperature,
            top_p=req.top_p,
            repetition_penalty=req.repetition_penalty,
            stop=req.stop_list(),
            params={"max_new_tokens": "max_completion_tokens" if req.max_completion_tokens else "max_tokens"},
        )
        return ChatInput(messages, ImageRef(url=part.image_url.url, where=where, spools=body.spools), options)

    # ------------------------------------------------------------------ answers
    async def create(
        self, body: ParsedBody, ctx: RequestContext, disconnected: Disconnected
    ) -> ChatCompletion | AsyncIterator[str]:
        """A `ChatCompletion`, or (`stream: true`) an iterator of SSE lines. Errors raised before
        the first streamed text are raised here, so they are plain HTTP errors."""
        req = self.parse(body)
        chat = self.chat_input(req, body)
        if req.stream:
            return await self._stream(req, chat, ctx, disconnected)
        job = await asyncio.to_thread(self.service.submit, chat, ctx)
        done = await self.service.complete(job, disconnected)
        return ChatCompletion(
            id=f"chatcmpl-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=self.model_name,
            choices=[Choice(message=AssistantMessage(content=done.text), finish_reason=done.finish_reason)],
            usage=_usage(done),
            uhrbat=await asyncio.to_thread(extension, req, done),
        )

    async def _stream(
        self, req: ChatCompletionRequest, chat: ChatInput, ctx: RequestContext, disconnected: Disconnected
    ) -> AsyncIterator[str]:
        events = self.service.events(chat, ctx, disconnected)
        # Wait for the first text (or the end) before answering, so that errors raised before
        # generation starts (bad budgets, a bad image, context overflow, ...) are HTTP errors.
        try:
            first = await anext(events)
            while first[0] == "stage":
                first = await anext(events)
        except BaseException:
            await events.aclose()
            raise
        cid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(delta: Delta, finish: str | None = None, **extra: Any) -> str:
            c = ChatCompletionChunk(
                id=cid,
                created=now,
                model=self.model_name,
                choices=[ChunkChoice(delta=delta, finish_reason=finish)],
                **extra,
            )
            data = c.model_dump(exclude_none=True)
            for choice in data["choices"]:
                choice.setdefault("finish_reason", None)
            return f"data: {json.dumps(data)}\n\n"

        async def lines() -> AsyncIterator[str]:
            sent = ""
            try:
                yield chunk(Delta(role="assistant", content=""))
                kind, value = first
                try:
                    while kind != "done":
                        if kind == "text":
                            sent += value
                            yield chunk(Delta(content=value))
                        kind, value = await anext(events)
                except Exception as e:  # noqa: BLE001  (failed after streaming began: report in-band, then end)
                    yield f"data: {json.dumps(api_error_of(e).body())}\n\n"
                    yield "data: [DONE]\n\n"
                    return
                done: Completion = value
                if done.text.startswith(sent) and len(done.text) > len(sent):
                    yield chunk(Delta(content=done.text[len(sent) :]))
                ext = await asyncio.to_thread(extension, req, done)
                yield chunk(Delta(), done.finish_reason, uhrbat=ext)
                if include_usage:
                    usage = ChatCompletionChunk(
                        id=cid, created=now, model=self.model_name, choices=[], usage=_usage(done)
                    )
                    yield f"data: {json.dumps(usage.model_dump(exclude_none=True))}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                await events.aclose()  # a client that went away cancels its row

        return lines()


def _usage(done: Completion) -> Usage:
    p, c = int(done.result.prompt_tokens), int(done.result.completion_tokens)
    return Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)


def extension(req: ChatCompletionRequest, done: Completion) -> dict[str, Any]:
    """The `uhrbat` response field: cache, timings, visual tokens; kept tokens on request."""
    res, source = done.result, done.source
    ext: dict[str, Any] = {
        "cache": res.cache,
        "num_visual_tokens": int(res.num_visual_tokens),
        "image_size": list(res.image_size),
        "timings": {k: float(v) for k, v in (res.timings or {}).items()},
        "queue_seconds": round(done.queued_s, 6),
        "batch_size": done.batch_size,
    }
    if req.return_tokens:
        from uhrbat.io.geo import tokens_geojson, tokens_with_boxes

        ext["tokens"] = tokens_with_boxes(res.tokens, source)
        if getattr(source, "georef", None) is not None:
            from uhrbat.errors import GeoError

            try:
                gj = tokens_geojson(res.tokens, source, properties={"answer": done.text})
            except GeoError as e:  # e.g. a CRS without a WGS84 transform: say so, keep the answer
                ext["geojson_error"] = str(e)
            else:
                gj["image"]["path"] = done.filename  # the client's file name, never a server path
                ext["geojson"] = gj
    return ext


__all__ = ["OpenAIServingChat", "extension"]
