"""The HTTP app: thin routes over `ChatService` (vLLM's `api_server.py` shape).

```python
from uhrbat.serving import ChatService, ServeOptions, create_app
app = create_app(ChatService(pipeline, ServeOptions(model_name="uhrbat")))
```

Routes: `GET /v1/models`, `POST /v1/chat/completions` (JSON or SSE stream), `GET /health`,
`GET /metrics`. A route authenticates (`ApiKeys` -> the request's tenant), reads the body
(`read_json_body`: off the event loop, images spooled to disk as they arrive) and hands over to
`OpenAIServingChat`. `uhrbat demo` adds its page's router to the same app (`serving.demo`), so the
page and API clients share one engine, one model and one error format: OpenAI's
`{"error": {"message", "type", "param", "code"}}` for every 4xx/5xx. The engine starts and stops
with the app (its lifespan).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
from collections.abc import Sequence
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from uhrbat.serving.body import JsonBodyReader, ParsedBody
from uhrbat.serving.chat_service import ChatService, api_error_of
from uhrbat.serving.guard import RequestGuard
from uhrbat.serving.limits import MAX_JSON_TEXT_BYTES
from uhrbat.serving.metrics import MetricsMiddleware
from uhrbat.serving.openai_api import APIError, ChatCompletion
from uhrbat.serving.openai_chat import OpenAIServingChat

log = logging.getLogger("uhrbat.serve")

_FEED_BYTES = 256 * 1024  # body pieces are handed to the parser thread in ~256 KiB batches


class ApiKeys:
    """`Authorization: Bearer KEY` -> the request's tenant. No keys: no authentication, tenant
    None. Each key is its own tenant, named by a digest prefix (never the key itself), so the
    issue-22 scene handles can be scoped by it."""

    def __init__(self, keys: Sequence[str]) -> None:
        self._keys = [(k.encode(), "key-" + hashlib.sha256(k.encode()).hexdigest()[:12]) for k in keys if k]

    def __bool__(self) -> bool:
        return bool(self._keys)

    def tenant(self, request: Request) -> str | None:
        if not self._keys:
            return None
        auth = request.headers.get("authorization", "")
        scheme, _, key = auth.partition(" ")
        if not auth:
            raise APIError(
                401,
                "missing API key: send 'Authorization: Bearer KEY' (openai.OpenAI(api_key=KEY))",
                type="authentication_error",
                code="invalid_api_key",
            )
        given = key.strip().encode()
        found = None
        for k, tenant in self._keys:  # compare with every key (constant time per key)
            if hmac.compare_digest(given, k) and scheme.lower() == "bearer":
                found = tenant
        if found is None:
            raise APIError(401, "invalid API key", type="authentication_error", code="invalid_api_key")
        return found


async def read_json_body(request: Request) -> ParsedBody:
    """The request's JSON body, parsed off the event loop as it arrives (see `serving.body`)."""
    reader = JsonBodyReader(MAX_JSON_TEXT_BYTES)
    pending: list[bytes] = []
    size = 0
    try:
        async for piece in request.stream():
            pending.append(piece)
            size += len(piece)
            if size >= _FEED_BYTES:
                await asyncio.to_thread(reader.feed, b"".join(pending))
                pending, size = [], 0
        if pending:
            await asyncio.to_thread(reader.feed, b"".join(pending))
    except BaseException:
        reader.abandon()
        raise
    return await asyncio.to_thread(reader.finish)


def openai_router(chat: OpenAIServingChat, keys: ApiKeys) -> APIRouter:
    """`/v1/models` and `/v1/chat/completions`: authenticate, read, hand over."""
    router = APIRouter()

    @router.get("/v1/models")
    def models(request: Request) -> dict[str, Any]:
        keys.tenant(request)
        return chat.models()

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        tenant = keys.tenant(request)
        body = await read_json_body(request)
        try:
            out = await chat.create(body, chat.service.context(tenant), request.is_disconnected)
        finally:
            body.release()  # spools no image handle claimed
        if isinstance(out, ChatCompletion):
            return JSONResponse(out.model_dump())
        return StreamingResponse(
            out, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )

    return router


def ops_router(service: ChatService, model_name: str) -> APIRouter:
    """`/health` and `/metrics` (open, for probes)."""
    router = APIRouter()

    @router.get("/health")
    def health() -> dict[str, Any]:
        engine = service.engine
        return {
            "status": "ok",
            "model": model_name,
            "model_loaded": engine.loaded,
            "queue_depth": engine.depth,
            "running": engine.running,
        }

    @router.get("/metrics")
    def metrics() -> Response:
        service.metrics.queue_depth.set(service.engine.depth)
        body, ctype = service.metrics.render()
        return Response(body, media_type=ctype)

    return router


def install_error_handlers(app: FastAPI, service: ChatService) -> None:
    """Every error -> OpenAI's error body; tracebacks only for real server faults."""
    from fastapi.exceptions import RequestValidationError
    from pydantic import ValidationError
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect

    from uhrbat.errors import UhrBatError
    from uhrbat.serving.limits import RequestCancelled

    def error_response(_request: Request, exc: BaseException) -> JSONResponse:
        err = api_error_of(exc, service.options.retry_after_s)
        if err.status == 500 and not isinstance(exc, APIError):
            log.error("request failed: %s", err.message, exc_info=exc)
        service.metrics.errors.labels(err.type).inc()
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    # Specific classes, so that starlette's ExceptionMiddleware answers them; only an unexpected
    # exception reaches the catch-all `Exception` handler (ServerErrorMiddleware, which also lets
    # the server log it).
    for exc_type in (
        APIError,
        UhrBatError,
        RequestCancelled,
        ClientDisconnect,
        RequestValidationError,
        ValidationError,
        HTTPException,
        Exception,
    ):
        app.add_exception_handler(exc_type, error_response)


def create_app(service: ChatService, *, extra_routes: Sequence[str] = ()) -> FastAPI:
    """The serving app over `service` (see the module docstring)."""
    opts = service.options
    app = FastAPI(title="UHR-BAT", docs_url=None, redoc_url=None, openapi_url=None, lifespan=service.lifespan)
    install_error_handlers(app, service)
    app.include_router(openai_router(OpenAIServingChat(service, opts.model_name), ApiKeys(opts.api_keys)))
    app.include_router(ops_router(service, opts.model_name))
    app.add_middleware(
        RequestGuard,
        max_bytes=opts.max_request_bytes,
        inflight=service.inflight,
        read_timeout_s=opts.read_timeout_s,
        metrics=service.metrics,
        flags=opts.flag,
        retry_after_s=opts.retry_after_s,
    )
    app.add_middleware(
        MetricsMiddleware,
        metrics=service.metrics,
        routes={"/v1/chat/completions", "/v1/models", "/health", "/metrics", *extra_routes},
    )
    return app


__all__ = ["ApiKeys", "create_app", "install_error_handlers", "openai_router", "ops_router", "read_json_body"]
