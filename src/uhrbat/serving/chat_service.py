"""`ChatService`: request -> options -> image -> answer or stream, for every front end.

The OpenAI routes (`serving.openai_chat`), the demo page (`serving.demo`) and Python callers
(batch's local engine) describe a question as a `ChatInput` — the conversation, the image
reference and the request's raw options — and hand it to one `ChatService`, which

1. checks the options against the server's limits (`check_options` -> `ChatOptions`; a 400
   naming the field and the flag otherwise);
2. resolves the image reference to an `ImageHandle` (`resolve_image`: the one place an image
   part becomes something the engine can open — issue 22's scene ids plug in here);
3. submits a `Job` to the engine (`submit`), whose prepare stage decodes the image off the
   request path and whose model thread answers;
4. waits for the answer (`complete`) or yields stage / text / done events (`events`).

Who asks and by when travels in a `RequestContext`: the tenant (the API key's, issue 22 scopes
scene ids and caches by it), the deadline and a request id for logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from uhrbat.errors import UhrBatError
from uhrbat.serving.body import SpooledURL
from uhrbat.serving.engine import Completion, Engine, Job
from uhrbat.serving.limits import (
    Deadline,
    InFlight,
    ModelFacts,
    RequestCancelled,
    ServeOptions,
    check_budget_values,
)
from uhrbat.serving.metrics import Metrics
from uhrbat.serving.openai_api import APIError, bad_request
from uhrbat.serving.uploads import ImageHandle, LocalImage, Spool, SpooledImage

log = logging.getLogger("uhrbat.serve")


@dataclass(frozen=True)
class RequestContext:
    """Who asks and by when (see the module docstring)."""

    tenant: str | None = None  # None: a server without API keys
    deadline: Deadline = field(default_factory=lambda: Deadline.after(None))
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])


@dataclass(frozen=True)
class ImageRef:
    """A request's image before it is resolved: an `image_url` string (data:, file://, or a
    spooled data: URL's placeholder), an uploaded file already spooled (the demo's form), or a
    local image (path, PIL image, opened source) from a trusted Python caller."""

    url: str | None = None
    upload: Spool | None = None
    local: Any = None
    where: str = "image"  # JSON path / form field, for error messages
    spools: Mapping[str, SpooledURL] = field(default_factory=dict)


@dataclass(frozen=True)
class RawOptions:
    """A request's options as the client gave them (None: not given). Names are the project's
    one options vocabulary; `params` maps a field to the name the client used (for errors)."""

    max_new_tokens: int | None = None
    budgets: Any = None
    selector: str | None = None
    kmeans_clusters: int | None = None
    kmeans_iters: int | None = None
    kmeans_mode: str | None = None
    seed: int | None = None
    encode: str | None = None
    gate_margin: float | None = None
    temperature: float | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    stop: Sequence[str] = ()
    bands: str | None = None
    return_relevance: bool = False
    params: Mapping[str, str] = field(default_factory=dict)

    def param(self, name: str) -> str:
        return self.params.get(name, name)


@dataclass(frozen=True)
class ChatOptions:
    """Checked options of one question, as the engine runs them."""

    max_new_tokens: int
    selection: Mapping[str, Any]  # `uhrbat.options.SelectionOptions` names: budgets, selector, kmeans_*, seed, encode
    generation: Mapping[str, Any]  # do_sample, temperature, top_p, repetition_penalty
    stops: tuple[str, ...] = ()
    seed: int | None = None  # sampling seed
    read: Mapping[str, Any] = field(default_factory=dict)  # untrusted-reader options
    return_relevance: bool = False


@dataclass(frozen=True)
class ChatInput:
    """One question for the service: the conversation (the pipeline's message format, the image
    as a `{"type": "image"}` part), its image and its options."""

    messages: list[dict[str, Any]]
    image: ImageRef
    options: RawOptions


class ChatService:
    """See the module docstring. Give a ready `pipeline` or a `pipeline_factory` (called once,
    on first use); `start()` / `close()` (or the app's lifespan) run the engine."""

    def __init__(
        self,
        pipeline: Any = None,
        options: ServeOptions | None = None,
        *,
        pipeline_factory: Callable[[], Any] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.options = options or ServeOptions()
        self.metrics = metrics or Metrics()
        o = self.options
        self.engine = Engine(
            pipeline,
            pipeline_factory=pipeline_factory,
            max_batch=o.max_batch,
            max_queue=o.max_queue,
            batch_wait_s=o.batch_wait_s,
            prepare_workers=o.decode_workers,
            metrics=self.metrics,
        )
        self._facts: ModelFacts | None = None
        self.inflight = InFlight(o.max_inflight_bytes)  # request-body bytes being received or answered

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> ChatService:
        self.engine.start()
        return self

    def close(self) -> None:
        self.engine.close()

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: Any = None) -> AsyncIterator[None]:
        """The app's lifespan: the engine starts once with the app and stops with it."""
        self.start()
        try:
            yield
        finally:
            await asyncio.to_thread(self.close)

    def context(self, tenant: str | None = None) -> RequestContext:
        """A new request's context; its deadline starts now."""
        return RequestContext(tenant, Deadline.after(self.options.request_timeout_s))

    @property
    def facts(self) -> ModelFacts:
        """Scales, default budgets and K-Means costs of the served model (loads it if lazy)."""
        if self._facts is None:
            self._facts = ModelFacts.of(self.engine.pipeline())
        return self._facts

    def max_kmeans_work(self) -> int:
        o = self.options
        return self.facts.default_kmeans_work() if o.max_kmeans_work is None else o.max_kmeans_work

    # ------------------------------------------------------------------ 1. options
    def check_options(self, raw: RawOptions) -> ChatOptions:
        """The request's options, checked against the server's limits (400 naming the field)."""
        from uhrbat.options import parse_budgets
        from uhrbat.selectors import check_selector_name

        o = self.options
        max_new = raw.max_new_tokens or o.max_new_tokens
        if max_new > o.max_new_tokens:
            p = raw.param("max_new_tokens")
            raise bad_request(
                f"{p} {max_new} exceeds this server's limit of {o.max_new_tokens} "
                f"(uhrbat serve {o.flag('max_new_tokens')})",
                p,
            )
        selection: dict[str, Any] = {}
        if raw.budgets is not None:
            p = raw.param("budgets")
            try:
                selection["budgets"] = check_budget_values(parse_budgets(raw.budgets, len(self.facts.scales)))
            except UhrBatError as e:
                raise bad_request(str(e), p) from None
        for name, limit in (("kmeans_clusters", o.max_kmeans_clusters), ("kmeans_iters", o.max_kmeans_iters)):
            value = getattr(raw, name)
            if value is not None and value > limit:
                raise bad_request(
                    f"{name} {value} exceeds this server's limit of {limit} (uhrbat serve {o.flag('max_' + name)})",
                    raw.param(name),
                )
        if raw.selector is not None:
            try:
                check_selector_name(raw.selector)  # the registry decides, not a list kept here
            except UhrBatError as e:
                raise bad_request(str(e), raw.param("selector")) from None
        for name in ("selector", "kmeans_clusters", "kmeans_iters", "kmeans_mode", "seed", "encode", "gate_margin"):
            if getattr(raw, name) is not None:
                selection[name] = getattr(raw, name)
        self._check_work(selection, raw)
        generation: dict[str, Any] = {}
        if raw.temperature:  # None or 0: greedy
            generation.update(do_sample=True, temperature=raw.temperature)
            if raw.top_p is not None:
                generation["top_p"] = raw.top_p
        if raw.repetition_penalty is not None:
            generation["repetition_penalty"] = raw.repetition_penalty
        read = dict(o.read_options(), **({"bands": raw.bands} if raw.bands else {}))
        return ChatOptions(max_new, selection, generation, tuple(raw.stop), raw.seed, read, raw.return_relevance)

    def _check_work(self, selection: dict[str, Any], raw: RawOptions) -> None:
        """Refuse up front a K-Means the server would spend too long on (clusters x tokens x
        iterations, see `ModelFacts.kmeans_work`)."""
        if not any(k in selection for k in ("budgets", "selector", "kmeans_clusters", "kmeans_iters")):
            return  # the server's own defaults: allowed by construction
        try:
            work = self.facts.kmeans_work(selection)
        except UhrBatError as e:  # e.g. kmeans_iters 0: the model's own option check
            raise bad_request(str(e), code=type(e).__name__) from None
        limit = self.max_kmeans_work()
        if work > limit:
            which = "kmeans_clusters" if "kmeans_clusters" in selection else "budgets"
            raise bad_request(
                f"this request asks K-Means for {work:,} cluster x token x iteration steps, more than this server's "
                f"limit of {limit:,} (uhrbat serve {self.options.flag('max_kmeans_work')}); ask for fewer "
                "kmeans_clusters or kmeans_iters, or smaller budgets",
                raw.param(which),
            )

    # ------------------------------------------------------------------ 2. the image
    def resolve_image(self, ref: ImageRef, options: ChatOptions, ctx: RequestContext) -> ImageHandle:
        """The request's image reference -> the handle the engine opens (off the request path).

        The one place an image part is interpreted: data: URLs (spooled or inline), `file://`
        URLs under the allowed root and uploads become untrusted handles; a trusted Python
        caller's local image goes to the pipeline as it is. A scene handle (issue 22: a
        `scene_id` looked up under `ctx.tenant`) is one more branch here."""
        from uhrbat.serving.media import image_handle

        if ref.upload is not None:
            return SpooledImage(ref.upload, dict(options.read))
        if ref.url is not None:
            o = self.options
            return image_handle(
                ref.url,
                spools=ref.spools,
                allowed_local_media_path=o.allowed_local_media_path,
                max_bytes=o.max_request_bytes,
                read_opts=dict(options.read),
                param=ref.where,
            )
        if ref.local is not None:
            return LocalImage(ref.local)
        raise bad_request(f"{ref.where}: no image given", ref.where)

    # ------------------------------------------------------------------ 3. submit
    def submit(
        self,
        chat: ChatInput,
        ctx: RequestContext,
        *,
        on_text: Callable[[str], None] | None = None,
        on_stage: Callable[[str], None] | None = None,
    ) -> Job:
        """Check, resolve and queue one question (never blocks on the model). Raises a 400
        `APIError` for bad options or image references, `ServerBusyError` when the queue is full.
        The handle is released when the job ends (or here, when it never starts)."""
        ctx.deadline.check("checking the request")
        options = self.check_options(chat.options)
        handle = self.resolve_image(chat.image, options, ctx)
        try:
            job = Job(
                image=handle,
                messages=chat.messages,
                max_new_tokens=options.max_new_tokens,
                generation=dict(options.generation),
                selection=dict(options.selection),
                stops=list(options.stops),
                seed=options.seed,
                return_relevance=options.return_relevance,
                deadline=ctx.deadline,
                on_text=on_text,
                on_stage=on_stage,
            )
            return self.engine.submit(job)
        except BaseException:
            handle.release()
            raise

    def answer(self, chat: ChatInput, ctx: RequestContext | None = None) -> Completion:
        """Synchronous `submit` + wait (Python callers, batch jobs): the answer or its error."""
        job = self.submit(chat, ctx or self.context())
        return job.future.result()

    # ------------------------------------------------------------------ 4. wait / stream
    async def complete(self, job: Job, disconnected: Callable[[], Awaitable[bool]]) -> Completion:
        """Wait for the job; a client that goes away (`disconnected()`) cancels it."""
        fut = asyncio.wrap_future(job.future)
        while True:
            done, _ = await asyncio.wait({fut}, timeout=0.25)
            if done:
                return _outcome(job)
            if await disconnected():
                job.cancel.set()
                raise RequestCancelled("client disconnected")
            job.alive()  # past its deadline while still queued: fails it now (the future says why)

    async def events(
        self, chat: ChatInput, ctx: RequestContext, disconnected: Callable[[], Awaitable[bool]]
    ) -> AsyncIterator[tuple[str, Any]]:
        """Submit `chat` and yield `("stage", name)`, `("text", delta)` and finally
        `("done", Completion)` as they happen. Errors before the job is queued are raised from
        the first `anext`; later ones (a bad image, a model error, the deadline) are raised
        where they happen. A client that goes away cancels the job."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def put(kind: str) -> Callable[[Any], None]:
            return lambda value: loop.call_soon_threadsafe(queue.put_nowait, (kind, value))

        job = await asyncio.to_thread(self.submit, chat, ctx, on_text=put("text"), on_stage=put("stage"))
        job.future.add_done_callback(lambda f: loop.call_soon_threadsafe(queue.put_nowait, ("end", f)))
        try:
            while True:
                try:
                    kind, value = await asyncio.wait_for(queue.get(), timeout=0.25)
                except TimeoutError:
                    if await disconnected():
                        raise RequestCancelled("client disconnected") from None
                    job.alive()  # past its deadline while still queued: fails it now
                    continue
                if kind == "end":
                    yield "done", _outcome(job)
                    return
                yield kind, value
        finally:
            if not job.future.done():
                job.cancel.set()  # the consumer went away: stop this row


def _outcome(job: Job) -> Completion:
    """A finished job's completion, or its error: a request's own failure (bad input, deadline,
    client gone) as it is; a crash inside the model logged here, once, and turned into a 500 for
    this request only (the server goes on)."""
    from uhrbat.serving.limits import RequestTimeout

    try:
        return job.future.result()
    except (APIError, UhrBatError, RequestCancelled, RequestTimeout):
        raise
    except Exception as e:
        log.error("request failed", exc_info=e)
        raise api_error_of(e) from e


def api_error_of(exc: BaseException, retry_after_s: int = 2) -> APIError:
    """Any exception -> the OpenAI-shaped error the client sees (the app's one error format)."""
    from fastapi.exceptions import RequestValidationError
    from pydantic import ValidationError
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect

    from uhrbat.errors import DecodeBusyError, ServerBusyError
    from uhrbat.serving.limits import RequestTimeout
    from uhrbat.serving.openai_api import validation_error

    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, (RequestCancelled, ClientDisconnect)):  # nginx's "client closed request"; nobody reads it
        return APIError(499, "the client closed the request", code="cancelled")
    if isinstance(exc, (ServerBusyError, DecodeBusyError)):
        return APIError(
            503, str(exc), type="server_error", code="overloaded", headers={"Retry-After": str(retry_after_s)}
        )
    if isinstance(exc, RequestTimeout):
        return APIError(504, str(exc), type="server_error", code="timeout")
    if isinstance(exc, UhrBatError):
        return bad_request(str(exc), code=type(exc).__name__)
    if isinstance(exc, (RequestValidationError, ValidationError)):
        return validation_error(exc)
    if isinstance(exc, HTTPException):
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return APIError(exc.status_code, str(exc.detail), type=kind, headers=dict(exc.headers or {}))
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error")


__all__ = [
    "ChatInput",
    "ChatOptions",
    "ChatService",
    "ImageRef",
    "RawOptions",
    "RequestContext",
    "api_error_of",
]
