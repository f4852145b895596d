"""The one serving app: OpenAI-compatible endpoints over the micro-batching engine.

```python
from uhrbat.serving.app import ServeOptions, create_app
from uhrbat.serving.engine import Engine
app = create_app(Engine(pipeline), ServeOptions(model_name="uhrbat"))
```

Routes: `GET /v1/models`, `POST /v1/chat/completions` (JSON or SSE stream), `GET /health`,
`GET /metrics`. `uhrbat demo` adds its page to the same app (`serving.demo`), so the page and
API clients share one queue, one model and one error format: OpenAI's
`{"error": {"message", "type", "param", "code"}}` for every 4xx/5xx.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from pydantic import ValidationError

from uhrbat.errors import DecodeBusyError, ServerBusyError, UhrBatError
from uhrbat.serving.engine import (
    Completion,
    Engine,
    Job,
    RequestCancelled,
    UntrustedImage,
)
from uhrbat.serving.media import conversation, read_image_url
from uhrbat.serving.metrics import Metrics, MetricsMiddleware
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
    bad_request,
    validation_error,
)

log = logging.getLogger("uhrbat.serve")

MiB = 1024 * 1024


@dataclass
class ServeOptions:
    """Server settings (the `uhrbat serve` options)."""

    model_name: str = "uhrbat"
    api_key: str | None = None
    allowed_local_media_path: str | None = None
    max_request_bytes: int = 256 * MiB  # whole HTTP body (base64 images included)
    max_request_option: str = "--max-request-mb"  # the flag that sets it, named in the 413 message
    max_new_tokens: int = 512  # default and upper limit of max_tokens / max_completion_tokens
    # Upper limits of what a client may ask K-Means to do (`extra_body`): clustering time grows with
    # clusters x iterations, so without a bound one request could hold the worker for minutes.
    max_kmeans_clusters: int = 3000
    max_kmeans_iters: int = 100
    max_pixels: int | None = None  # None: the reader's default limit; 0: no limit
    retry_after_s: int = 2

    def read_options(self) -> dict[str, Any]:
        """Keyword arguments for the untrusted reader."""
        return {} if self.max_pixels is None else {"max_pixels": self.max_pixels or None}


# ----------------------------------------------------------------------------- helpers
def model_scales(pipeline: Any) -> list[int]:
    """The pipeline's scales (real pipeline: the model config; fake: `.scales`)."""
    scales = getattr(pipeline, "scales", None)
    if scales is None:
        scales = pipeline.model.config.scales
    return list(scales)


def api_error_of(exc: BaseException, retry_after_s: int = 2) -> APIError:
    """Any exception -> the OpenAI-shaped error the client sees."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, RequestCancelled):  # nginx's "client closed request"; nobody reads it
        return APIError(499, "the client closed the request", code="cancelled")
    if isinstance(exc, (ServerBusyError, DecodeBusyError)):
        return APIError(
            503, str(exc), type="server_error", code="overloaded", headers={"Retry-After": str(retry_after_s)}
        )
    if isinstance(exc, UhrBatError):
        return bad_request(str(exc), code=type(exc).__name__)
    if isinstance(exc, (RequestValidationError, ValidationError)):
        return validation_error(exc)
    if isinstance(exc, HTTPException):
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return APIError(exc.status_code, str(exc.detail), type=kind, headers=dict(exc.headers or {}))
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error")


class BodyLimitMiddleware:
    """413 for bodies over `max_bytes`: by Content-Length before reading, else while reading."""

    def __init__(
        self, app: Any, max_bytes: int, metrics: Metrics | None = None, option: str = "--max-request-mb"
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.option = option
        self.metrics = metrics  # rejections here never reach the app's error handler: count them

    def _too_large(self) -> APIError:
        return APIError(
            413,
            f"request body larger than the server's limit of {self.max_bytes / MiB:g} MiB ({self.option})",
            code="request_too_large",
        )

    async def _reject(self, send: Any) -> None:
        err = self._too_large()
        if self.metrics is not None:
            self.metrics.errors.labels(err.type).inc()
        body = json.dumps(err.body()).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"connection", b"close")],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._reject(send)
            return
        seen = {"bytes": 0, "started": False}

        async def _receive() -> dict:
            message = await receive()
            if message["type"] == "http.request":
                seen["bytes"] += len(message.get("body", b""))
                if seen["bytes"] > self.max_bytes:
                    raise self._too_large()
            return message

        async def _send(message: dict) -> None:
            if message["type"] == "http.response.start":
                seen["started"] = True
            await send(message)

        try:
            await self.app(scope, _receive, _send)
        except APIError as e:
            if e.status != 413 or seen["started"]:
                raise
            await self._reject(send)


# ----------------------------------------------------------------------------- app
def create_app(engine: Engine, options: ServeOptions | None = None, *, metrics: Metrics | None = None) -> Any:
    """The FastAPI app (see the module docstring). Starts the engine; stops it on shutdown."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException

    opts = options or ServeOptions()
    metrics = metrics or engine.metrics or Metrics()
    engine.metrics = metrics
    engine.start()
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(_app: Any) -> AsyncIterator[None]:
        engine.start()
        yield
        await run_in_threadpool(engine.close)

    app = FastAPI(title="UHR-BAT", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.engine = engine
    app.state.options = opts
    app.state.metrics = metrics

    def error_response(exc: BaseException) -> JSONResponse:
        err = api_error_of(exc, opts.retry_after_s)
        if err.status >= 500 and err.status != 503 and not isinstance(exc, APIError):
            log.error("request failed: %s", err.message, exc_info=exc)
        metrics.errors.labels(err.type).inc()
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    for exc_type in (
        APIError,
        UhrBatError,
        RequestCancelled,
        RequestValidationError,
        ValidationError,
        HTTPException,
        Exception,
    ):
        app.add_exception_handler(exc_type, lambda _req, exc: error_response(exc))

    def check_key(request: Request) -> None:
        if not opts.api_key:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, key = auth.partition(" ")
        if not auth:
            raise APIError(
                401,
                "missing API key: send 'Authorization: Bearer KEY' (openai.OpenAI(api_key=KEY))",
                type="authentication_error",
                code="invalid_api_key",
            )
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), opts.api_key.encode()):
            raise APIError(401, "invalid API key", type="authentication_error", code="invalid_api_key")

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": opts.model_name,
            "model_loaded": engine.loaded,
            "queue_depth": engine.depth,
            "running": engine.running,
        }

    @app.get("/metrics")
    def prom() -> Response:
        metrics.queue_depth.set(engine.depth)
        body, ctype = metrics.render()
        return Response(body, media_type=ctype)

    @app.get("/v1/models")
    def models(request: Request) -> dict[str, Any]:
        check_key(request)
        return ModelList(data=[ModelCard(id=opts.model_name, created=created)]).model_dump()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        check_key(request)
        try:
            payload = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise bad_request(f"the request body is not valid JSON ({e})") from None
        except RecursionError:  # "[[[[...": json.loads recurses once per level
            raise bad_request("the request body is nested too deeply to be a chat request") from None
        if not isinstance(payload, dict):
            raise bad_request("the request body must be a JSON object")
        req = ChatCompletionRequest.model_validate(payload)
        req.check_supported()
        if req.model != opts.model_name:
            raise APIError(
                404,
                f"model {req.model!r} does not exist; this server serves {opts.model_name!r}",
                param="model",
                code="model_not_found",
            )
        job = await run_in_threadpool(build_job, req)
        if req.stream:
            return await stream(request, req, job)
        done = await wait_for(request, job)
        body = ChatCompletion(
            id=f"chatcmpl-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=opts.model_name,
            choices=[Choice(message=AssistantMessage(content=done.text), finish_reason=done.finish_reason)],
            usage=usage(done),
            uhrbat=await run_in_threadpool(extension, req, done, job.filename),
        )
        return JSONResponse(body.model_dump())

    def build_job(req: ChatCompletionRequest) -> Job:
        """Validate options, read the image bytes, make the job (thread pool). The worker decodes
        the bytes (`UntrustedImage`), so a queued request holds only its compressed image."""
        from uhrbat.processing.processing_uhrbat import parse_budgets

        messages, part, where = conversation(req.messages)
        max_new = req.max_new_tokens(opts.max_new_tokens)
        if max_new > opts.max_new_tokens:
            param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
            raise bad_request(
                f"{param} {max_new} exceeds this server's limit of {opts.max_new_tokens} "
                "(uhrbat serve --max-new-tokens)",
                param,
            )
        selection: dict[str, Any] = {}
        if req.budgets is not None:
            try:
                selection["budgets"] = parse_budgets(req.budgets, len(model_scales(engine.pipeline())))
            except UhrBatError as e:
                raise bad_request(str(e), "budgets") from None
        limits = {
            "kmeans_clusters": (opts.max_kmeans_clusters, "--max-clusters"),
            "kmeans_iters": (opts.max_kmeans_iters, "--max-iters"),
        }
        for name, (limit, flag) in limits.items():
            value = getattr(req, name)
            if value is not None and value > limit:
                raise bad_request(f"{name} {value} exceeds this server's limit of {limit} (uhrbat serve {flag})", name)
        for name in ("selector", "kmeans_clusters", "kmeans_iters", "seed"):
            if getattr(req, name) is not None:
                selection[name] = getattr(req, name)
        generation: dict[str, Any] = {}
        if req.temperature:  # None or 0: greedy
            generation.update(do_sample=True, temperature=req.temperature)
            if req.top_p is not None:
                generation["top_p"] = req.top_p
        if req.repetition_penalty is not None:
            generation["repetition_penalty"] = req.repetition_penalty
        raw = read_image_url(
            part.image_url.url,
            allowed_local_media_path=opts.allowed_local_media_path,
            max_bytes=opts.max_request_bytes,
            param=where,
        )
        image = UntrustedImage(raw.data, raw.filename, opts.read_options(), where, path=raw.path, root=raw.root)
        return Job(
            image=image,
            messages=messages,
            max_new_tokens=max_new,
            generation=generation,
            selection=selection,
            stops=req.stop_list(),
            seed=req.seed,
        )

    async def wait_for(request: Request, job: Job) -> Completion:
        """Queue the job and wait; a client that goes away cancels it."""
        engine.submit(job)
        fut = asyncio.wrap_future(job.future)
        while True:
            done, _ = await asyncio.wait({fut}, timeout=0.25)
            if done:
                try:
                    return fut.result()
                except (APIError, UhrBatError, RequestCancelled):
                    raise
                except Exception as e:  # a model crash: a 500 for this request, the server goes on
                    log.error("request failed", exc_info=e)
                    raise api_error_of(e) from e
            if await request.is_disconnected():
                job.cancel.set()
                raise RequestCancelled("client disconnected")

    def usage(done: Completion) -> Usage:
        p, c = int(done.result.prompt_tokens), int(done.result.completion_tokens)
        return Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)

    def extension(req: ChatCompletionRequest, done: Completion, filename: str) -> dict[str, Any]:
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
                    gj["image"]["path"] = filename  # the client's file name, never a server path
                    ext["geojson"] = gj
        return ext

    async def stream(request: Request, req: ChatCompletionRequest, job: Job) -> Any:
        filename = job.filename
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        end = object()
        job.on_text = lambda text: loop.call_soon_threadsafe(queue.put_nowait, text)
        job.future.add_done_callback(lambda _f: loop.call_soon_threadsafe(queue.put_nowait, end))
        engine.submit(job)
        # Wait for the first text (or the end) before answering, so that errors raised before
        # generation starts (bad budgets, context overflow, ...) are plain HTTP errors.
        while True:
            try:
                first = await asyncio.wait_for(queue.get(), timeout=0.25)
                break
            except TimeoutError:
                if await request.is_disconnected():
                    job.cancel.set()
                    raise RequestCancelled("client disconnected") from None
        if first is end and job.future.exception() is not None:
            exc = job.future.exception()
            if not isinstance(exc, (APIError, UhrBatError, RequestCancelled)):
                log.error("request failed", exc_info=exc)
            raise api_error_of(exc)
        cid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def sse(chunk: ChatCompletionChunk | dict[str, Any]) -> str:
            data = chunk.model_dump(exclude_none=True) if isinstance(chunk, ChatCompletionChunk) else chunk
            if isinstance(chunk, ChatCompletionChunk):
                for choice in data["choices"]:
                    choice.setdefault("finish_reason", None)
            return f"data: {json.dumps(data)}\n\n"

        def chunk(delta: Delta, finish: str | None = None, **extra: Any) -> ChatCompletionChunk:
            return ChatCompletionChunk(
                id=cid,
                created=now,
                model=opts.model_name,
                choices=[ChunkChoice(delta=delta, finish_reason=finish)],
                **extra,
            )

        async def events() -> AsyncIterator[str]:
            sent = ""
            try:
                yield sse(chunk(Delta(role="assistant", content="")))
                item = first
                while item is not end:
                    sent += item
                    yield sse(chunk(Delta(content=item)))
                    item = await queue.get()
                try:
                    done: Completion = job.future.result()
                except Exception as e:  # noqa: BLE001  (failed after streaming began: report in-band, then end)
                    yield f"data: {json.dumps(api_error_of(e).body())}\n\n"
                    yield "data: [DONE]\n\n"
                    return
                if done.text.startswith(sent) and len(done.text) > len(sent):
                    yield sse(chunk(Delta(content=done.text[len(sent) :])))
                ext = await run_in_threadpool(extension, req, done, filename)
                yield sse(chunk(Delta(), done.finish_reason, uhrbat=ext))
                if include_usage:
                    yield sse(
                        ChatCompletionChunk(id=cid, created=now, model=opts.model_name, choices=[], usage=usage(done))
                    )
                yield "data: [DONE]\n\n"
            finally:
                if not job.future.done():
                    job.cancel.set()  # the client went away: stop this row's generation

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )

    app.state.build_job = build_job
    app.state.wait_for = wait_for
    app.add_middleware(
        BodyLimitMiddleware, max_bytes=opts.max_request_bytes, metrics=metrics, option=opts.max_request_option
    )
    app.add_middleware(
        MetricsMiddleware,
        metrics=metrics,
        routes={"/v1/chat/completions", "/v1/models", "/health", "/metrics", "/", "/api/ask"},
    )
    return app


def serve(app: Any, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Run the app with uvicorn (blocking)."""
    import uvicorn

    if host not in ("127.0.0.1", "localhost", "::1") and not app.state.options.api_key:
        log.warning("serving on %s without an API key: anyone who can reach it can run the model", host)
    uvicorn.run(app, host=host, port=port, log_level=log_level)


class serve_in_thread:
    """Context manager: run the app with uvicorn on 127.0.0.1 (a free port) in a thread; yields the base URL."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0) -> None:
        import socket
        import threading

        import uvicorn

        if port == 0:
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        self.url = f"http://{host}:{port}/"
        self.server = uvicorn.Server(
            uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off", timeout_graceful_shutdown=2)
        )
        self._thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self._thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            if time.time() > deadline or not self._thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=10)


__all__ = [
    "BodyLimitMiddleware",
    "ServeOptions",
    "api_error_of",
    "create_app",
    "model_scales",
    "serve",
    "serve_in_thread",
]
