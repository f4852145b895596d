"""The serving engine: a bounded request queue and one worker thread that micro-batches.

Requests (`Job`) wait in a bounded queue; a full queue raises `ServerBusyError` (the app answers
503 + Retry-After). One worker thread owns the model: it takes the oldest job, waits up to
`batch_wait_s` for more, and runs up to `max_batch` compatible jobs (same selection and
sampling options) as one left-padded batch through `pipeline.chat_batch` — equal to one-by-one
results, since the model batches with left padding. Sampled requests (temperature > 0) run alone
so that their seed means the same as in a single request.

Per row, a `RowControl` stopping criterion ends generation at that row's `max_new_tokens`, at one
of its stop strings, or when its client has gone (its `cancel` event is set); a `RowStreamer`
turns new token ids into text deltas for streamed requests. Both are plain transformers
generation hooks, so the real pipeline and `serving.fake.FakePipeline` share them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from uhrbat.errors import ServerBusyError

log = logging.getLogger("uhrbat.serve")


class RequestCancelled(Exception):
    """The client went away before its answer was ready (internal; never sent to a client)."""


@dataclass
class UntrustedImage:
    """Request bytes (or a file under the server's allowed media root), decoded by the worker
    just before its batch runs (see `open`)."""

    data: bytes | None
    filename: str
    read_opts: dict[str, Any] = field(default_factory=dict)
    where: str | None = None  # prefix for error messages, e.g. "messages.0.content.1.image_url"
    path: str | None = None  # instead of `data`: a file, re-checked to lie inside `root`
    root: str | None = None

    def open(self) -> Any:
        """Decode with the untrusted reader inside `uhrbat.io.decode_section()`. The worker
        decodes here, next to the model run it serialises with, so queued requests hold only
        their compressed bytes and at most one batch of decoded images exists at a time."""
        from uhrbat.errors import ImageLoadError, UhrBatError
        from uhrbat.io import decode_section, open_image, open_image_bytes

        try:
            with decode_section():
                if self.data is not None:
                    source = open_image_bytes(self.data, filename=self.filename, **self.read_opts)
                    what = ("bytes", hashlib.sha256(self.data).hexdigest())
                else:
                    from uhrbat.serving.media import inside

                    real = inside(self.root, self.path) if self.root and self.path else None
                    if real is None:  # the file was swapped for a link out of the root since the request
                        raise ImageLoadError(f"{self.filename!r} is outside the allowed local media path")
                    source = open_image(real, trust="untrusted", **self.read_opts)
                    st = os.stat(real)
                    what = ("file", real, st.st_size, st.st_mtime_ns, st.st_ino)
        except UhrBatError as e:
            if self.where is None:
                raise
            raise type(e)(f"{self.where}: {e}") from None
        # Clients resend the image with every follow-up: this key lets the pipeline's scene cache
        # recognise it without re-tiling (same bytes and read options -> same pixels).
        source.cache_fingerprint = json.dumps([*what, sorted(self.read_opts.items())], default=str)
        return source


@dataclass(eq=False)
class Job:
    """One chat request, ready for the model.

    `image` is an `UntrustedImage` (decoded by the worker into `source`) or anything the
    pipeline opens itself (path, PIL image, image source); `messages` the conversation in the pipeline's format;
    `generation` holds sampling options (temperature, top_p, do_sample, repetition_penalty),
    `selection` the token-selection options (budgets, selector, kmeans_*, seed)."""

    image: Any
    messages: list[dict[str, Any]]
    max_new_tokens: int
    generation: dict[str, Any] = field(default_factory=dict)
    selection: dict[str, Any] = field(default_factory=dict)
    stops: list[str] = field(default_factory=list)
    seed: int | None = None
    return_relevance: bool = False
    on_text: Callable[[str], None] | None = None  # streamed text deltas (called from the worker thread)
    cancel: threading.Event = field(default_factory=threading.Event)
    future: Future = field(default_factory=Future)
    enqueued_at: float = field(default_factory=time.perf_counter)
    source: Any = None  # the opened image (set by the worker)
    filename: str | None = None  # the client's name for the image (from an `UntrustedImage`)

    def __post_init__(self) -> None:
        if self.filename is None and isinstance(self.image, UntrustedImage):
            self.filename = self.image.filename

    def open_image(self) -> None:
        if self.source is None:
            self.source = self.image.open() if isinstance(self.image, UntrustedImage) else self.image
            self.image = self.source  # drop the request bytes

    def batch_key(self) -> str:
        """Jobs with equal keys may share a batch."""
        if self.generation.get("do_sample"):
            return f"solo:{id(self)}"
        return json.dumps([self.generation, self.selection, self.return_relevance], sort_keys=True, default=str)


@dataclass
class Completion:
    """A finished job: the pipeline's `AskResult`, the answer text after stop strings, and why it ended."""

    result: Any
    text: str
    finish_reason: str  # "stop" | "length"
    source: Any = None  # the opened image (pixel boxes, GeoJSON, overlays)
    queued_s: float = 0.0
    batch_size: int = 1


def trim_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """Cut `text` before the first occurrence of any stop string (OpenAI excludes it)."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text, False) if cut < 0 else (text[:cut], True)


class RowControl(StoppingCriteria):
    """Per-row stop: own `max_new_tokens`, stop strings, or a cancelled client."""

    def __init__(self, jobs: Sequence[Job], tokenizer: Any) -> None:
        self.jobs = list(jobs)
        self.tokenizer = tokenizer
        self.steps = 0
        self.prompt_len: int | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        self.steps += 1
        if self.prompt_len is None:  # first call: the prompt plus the first new token
            self.prompt_len = input_ids.shape[1] - 1
        done = []
        for i, job in enumerate(self.jobs):
            stop = job.cancel.is_set() or self.steps >= job.max_new_tokens
            if not stop and job.stops:
                text = self.tokenizer.decode(input_ids[i, self.prompt_len :].tolist(), skip_special_tokens=True)
                stop = any(s in text for s in job.stops)
            done.append(stop)
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class RowStreamer(BaseStreamer):
    """Token ids -> per-row text deltas. The first `put` (the prompt) is skipped; text that may
    still change (an incomplete UTF-8 sequence, a possible stop-string prefix, leading and
    trailing whitespace that the final answer strips) is held back, so the concatenated deltas
    are always a prefix of the final answer."""

    def __init__(self, jobs: Sequence[Job], tokenizer: Any) -> None:
        self.jobs = list(jobs)
        self.tokenizer = tokenizer
        self.ids: list[list[int]] = [[] for _ in self.jobs]
        self.sent = [""] * len(self.jobs)
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        value = value.reshape(len(self.jobs), -1)
        for i, job in enumerate(self.jobs):
            if job.on_text is None or job.cancel.is_set():
                continue
            self.ids[i].extend(value[i].tolist())
            text = self._safe_text(i)
            if len(text) > len(self.sent[i]) and text.startswith(self.sent[i]):
                try:
                    job.on_text(text[len(self.sent[i]) :])
                except Exception:  # a gone consumer stops its own row, never the batch
                    log.warning("dropping a stream whose consumer failed", exc_info=True)
                    job.cancel.set()
                    continue
                self.sent[i] = text

    def _safe_text(self, i: int) -> str:
        text = self.tokenizer.decode(self.ids[i], skip_special_tokens=True).strip()
        stops = self.jobs[i].stops
        text, hit = trim_at_stop(text, stops)
        if not hit and stops:  # hold back a tail that could still grow into a stop string
            for k in range(min(len(text), max(map(len, stops)) - 1), 0, -1):
                if any(s.startswith(text[-k:]) for s in stops):
                    text = text[:-k]
                    break
        return text.rstrip("\ufffd").rstrip()

    def end(self) -> None:
        pass


class Engine:
    """Bounded queue + micro-batching worker around a pipeline (see the module docstring).

    `pipeline` is a ready pipeline or a zero-argument factory (called once, under a lock, on
    first use). Call `start()` before `submit()`, `close()` when done."""

    def __init__(
        self,
        pipeline: Any = None,
        *,
        pipeline_factory: Callable[[], Any] | None = None,
        max_batch: int = 8,
        max_queue: int = 64,
        batch_wait_s: float = 0.02,
        metrics: Any = None,
    ) -> None:
        if pipeline is None and pipeline_factory is None:
            raise ValueError("Engine needs a pipeline or a pipeline_factory")
        if max_batch < 1 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be >= 1")
        self._pipeline = pipeline
        self._factory = pipeline_factory
        self._pipeline_lock = threading.Lock()
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.batch_wait_s = batch_wait_s
        self.metrics = metrics
        self._pending: deque[Job] = deque()
        self._cond = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.running = 0  # jobs in the batch being run

    # ------------------------------------------------------------------ pipeline
    @property
    def loaded(self) -> bool:
        return self._pipeline is not None

    def pipeline(self) -> Any:
        """The pipeline, built by the factory on first use (once, even with concurrent callers)."""
        if self._pipeline is None:
            with self._pipeline_lock:
                if self._pipeline is None:
                    self._pipeline = self._factory()  # type: ignore[misc]
        return self._pipeline

    # ------------------------------------------------------------------ queue
    @property
    def depth(self) -> int:
        return len(self._pending)

    def start(self) -> Engine:
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._loop, name="uhrbat-engine", daemon=True)
            self._thread.start()
        return self

    def close(self, timeout: float = 30) -> None:
        with self._cond:
            self._stop = True
            pending, self._pending = list(self._pending), deque()
            self._cond.notify_all()
        for job in pending:
            job.cancel.set()
            _fail(job, RequestCancelled("the server is shutting down"))
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def submit(self, job: Job) -> Job:
        """Queue a job; raises `ServerBusyError` when `max_queue` jobs are already waiting."""
        with self._cond:
            if self._stop or self._thread is None:
                raise ServerBusyError("the server is not running")
            if len(self._pending) >= self.max_queue:
                raise ServerBusyError(f"the request queue is full ({self.max_queue} waiting); retry later")
            job.enqueued_at = time.perf_counter()
            self._pending.append(job)
            self._gauge()
            self._cond.notify_all()
        return job

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(len(self._pending))

    def _take_batch(self) -> list[Job]:
        with self._cond:
            while not self._pending and not self._stop:
                self._cond.wait()
            if self._stop:
                return []
            first = self._pending.popleft()
            key = first.batch_key()
            if self.max_batch > 1 and self.batch_wait_s > 0:
                deadline = time.monotonic() + self.batch_wait_s
                while (
                    sum(j.batch_key() == key for j in self._pending) < self.max_batch - 1
                    and (left := deadline - time.monotonic()) > 0
                    and not self._stop
                ):
                    self._cond.wait(left)
            batch, keep = [first], deque()
            for job in self._pending:
                if len(batch) < self.max_batch and job.batch_key() == key:
                    batch.append(job)
                else:
                    keep.append(job)
            self._pending = keep
            self._gauge()
        live = []
        for job in batch:
            if job.cancel.is_set():
                _fail(job, RequestCancelled("cancelled while queued"))
            else:
                live.append(job)
        return live

    def _loop(self) -> None:
        while True:
            batch = self._take_batch()
            if self._stop:
                for job in batch:
                    _fail(job, RequestCancelled("the server is shutting down"))
                return
            if not batch:
                continue
            self.running = len(batch)
            try:
                self._run(batch)
            except BaseException as e:  # never let the worker die
                log.exception("engine batch failed")
                for job in batch:
                    _fail(job, e)
            finally:
                self.running = 0

    # ------------------------------------------------------------------ model
    def _run(self, batch: list[Job]) -> None:
        try:
            pipe = self.pipeline()
        except BaseException as e:  # noqa: BLE001  (a failed model load fails these requests, not the worker)
            for job in batch:
                _fail(job, e)
            return
        ready = []
        for job in batch:  # a bad image fails its own request only
            try:
                job.open_image()
            except Exception as e:  # noqa: BLE001  (handed to the request's future)
                _fail(job, e)
            else:
                ready.append(job)
        if not ready:
            return
        batch = ready
        tokenizer = pipe.processor.tokenizer
        first = batch[0]
        streamer = RowStreamer(batch, tokenizer) if any(j.on_text for j in batch) else None
        control = RowControl(batch, tokenizer)
        started = time.perf_counter()
        if first.generation.get("do_sample") and first.seed is not None:
            torch.manual_seed(first.seed)  # sampled jobs run alone, so this seeds exactly this request
        try:
            results = pipe.chat_batch(
                [j.source for j in batch],
                [j.messages for j in batch],
                max_new_tokens=max(j.max_new_tokens for j in batch),
                stopping_criteria=StoppingCriteriaList([control]),
                streamer=streamer,
                return_relevance=first.return_relevance,
                **first.generation,
                **first.selection,
            )
        except Exception as e:  # noqa: BLE001  (handed to the requests' futures)
            if len(batch) > 1 and not (streamer and any(streamer.sent)):
                # One bad request must not fail the others: retry them one by one.
                for job in batch:
                    self._run([job])
                return
            for job in batch:
                _fail(job, e)
            return
        if self.metrics is not None:
            self.metrics.batch_size.observe(len(batch))
        for job, res in zip(batch, results):
            text, hit = trim_at_stop(res.answer, job.stops)
            length = not hit and len(res.generated_ids) >= job.max_new_tokens  # answer ids, EOS excluded
            done = Completion(
                res, text, "length" if length else "stop", job.source, started - job.enqueued_at, len(batch)
            )
            if self.metrics is not None:
                self.metrics.observe_result(res, done.queued_s)
            if not job.future.done():
                job.future.set_result(done)


def _fail(job: Job, exc: BaseException) -> None:
    if not job.future.done():
        job.future.set_exception(exc)


__all__ = [
    "Completion",
    "Engine",
    "Job",
    "RequestCancelled",
    "RowControl",
    "RowStreamer",
    "UntrustedImage",
    "trim_at_stop",
]
