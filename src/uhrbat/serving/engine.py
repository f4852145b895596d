"""The serving engine: two stages between a request and its answer, each in its own threads.

1. **Prepare** (`prepare_workers` threads): takes admitted jobs in arrival order and opens their
   image (`ImageHandle.open`: the untrusted reader inside `uhrbat.io.decode_section()`), off the
   request path and off the model's thread, so a slow decode holds one prepare thread, never the
   model. At most `max_batch` opened images wait for or sit in the model at a time (memory: one
   batch of decoded images); a prepare thread waits for a free slot before it decodes.
2. **Model** (one thread, it owns the model): takes the oldest prepared job, waits up to
   `batch_wait_s` for more, and runs up to `max_batch` compatible jobs (same selection and
   sampling options) as one left-padded batch through `pipeline.chat_batch` — equal to one-by-one
   results, since the model batches with left padding. Sampled requests (temperature > 0) run
   alone so that their seed means the same as in a single request.

Admission is bounded: more than `max_queue` jobs waiting (in either stage) raises
`ServerBusyError` (the app answers 503 + Retry-After). Every job carries a `Deadline` and a
`cancel` event, checked between stages, at the pipeline's stage boundaries (`BatchProgress`, its
`progress=` callback) and at every generated token (`RowControl`): an expired or
abandoned row stops and fails alone; the rest of its batch goes on. `job.on_stage` hears each
stage (the demo shows it), `job.on_text` each streamed text delta (`RowStreamer`). Both hooks are
plain transformers generation hooks, so any pipeline with `chat_batch` works.
"""

from __future__ import annotations

import json
import logging
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
from uhrbat.serving.limits import Deadline, RequestCancelled
from uhrbat.serving.uploads import ImageHandle

log = logging.getLogger("uhrbat.serve")


@dataclass(eq=False)
class Job:
    """One chat request, ready for the model.

    `image` is an `ImageHandle` (opened by a prepare thread into `source`) or anything the
    pipeline opens itself (path, PIL image, image source); `messages` the conversation in the
    pipeline's format; `generation` holds sampling options (temperature, top_p, do_sample,
    repetition_penalty), `selection` the token-selection options (budgets, selector, kmeans_*, seed)."""

    image: Any
    messages: list[dict[str, Any]]
    max_new_tokens: int
    generation: dict[str, Any] = field(default_factory=dict)
    selection: dict[str, Any] = field(default_factory=dict)
    stops: list[str] = field(default_factory=list)
    seed: int | None = None
    return_relevance: bool = False
    deadline: Deadline = field(default_factory=lambda: Deadline.after(None))
    on_text: Callable[[str], None] | None = None  # streamed text deltas (called from the model thread)
    on_stage: Callable[[str], None] | None = None  # stage names (called from the engine's threads)
    cancel: threading.Event = field(default_factory=threading.Event)
    future: Future = field(default_factory=Future)
    enqueued_at: float = field(default_factory=time.perf_counter)
    stage: str = "queued"
    source: Any = None  # the opened image (set by a prepare thread)
    filename: str | None = None  # the client's name for the image

    def __post_init__(self) -> None:
        if self.filename is None and isinstance(self.image, ImageHandle):
            self.filename = self.image.filename

    def open_image(self) -> None:
        if self.source is None:
            self.source = self.image.open() if isinstance(self.image, ImageHandle) else self.image

    def set_stage(self, stage: str) -> None:
        self.stage = stage
        if self.on_stage is not None:
            try:
                self.on_stage(stage)
            except Exception:  # a gone listener never stops the job
                log.debug("stage listener failed", exc_info=True)

    def alive(self) -> bool:
        """Not done, cancelled or past its deadline; fails the job (once) when it is not."""
        if self.future.done():
            return False
        if self.cancel.is_set():
            _fail(self, RequestCancelled("the client went away"))
            return False
        if self.deadline.expired():
            self.cancel.set()  # stops its row in a running batch
            _fail(self, self.deadline.error(self.stage))
            return False
        return True

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
    filename: str | None = None  # the client's name for the image (GeoJSON `image.path`)


def trim_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """Cut `text` before the first occurrence of any stop string (OpenAI excludes it)."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text, False) if cut < 0 else (text[:cut], True)


class BatchAbandoned(Exception):
    """Every row of a running batch was cancelled or timed out (raised inside `chat_batch` to stop it)."""


class BatchProgress:
    """The pipeline's `progress=` callback for one batch (`uhrbat.progress`: `progress(stage,
    info)` as each stage begins; it may raise to cancel): it tells each row's listener the stage,
    fails rows that were cancelled or ran past their deadline, and stops the whole batch (raises
    `BatchAbandoned`) once no row is left."""

    def __init__(self, jobs: Sequence[Job]) -> None:
        self.jobs = list(jobs)

    def __call__(self, stage: Any = None, *_: Any, **__: Any) -> None:
        name = str(getattr(stage, "value", stage))
        if name == "done":  # the answers are ready: deliver them, whatever the clock says now
            return
        for job in self.jobs:
            if not job.future.done():
                job.stage = name  # a row that fails here failed entering this stage
        live = [j for j in self.jobs if j.alive()]
        for job in live:
            job.set_stage(name)
        if not live:
            raise BatchAbandoned(name)


class RowControl(StoppingCriteria):
    """Per-row stop: own `max_new_tokens`, stop strings, a cancelled client or a passed deadline.
    A row that has ended (its end-of-sequence token, `eos_ids`) is left alone: it only waits for
    the batch, and its answer is delivered with it even if the deadline passes meanwhile."""

    def __init__(self, jobs: Sequence[Job], tokenizer: Any, eos_ids: Any = None) -> None:
        self.jobs = list(jobs)
        self.tokenizer = tokenizer
        self.eos = torch.tensor(sorted(_id_set(eos_ids)), dtype=torch.long)
        self.ended = [False] * len(self.jobs)
        self.steps = 0
        self.prompt_len: int | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        self.steps += 1
        if self.prompt_len is None:  # first call: the prompt plus the first new token
            self.prompt_len = input_ids.shape[1] - 1
            for job in self.jobs:
                if not job.future.done():
                    job.set_stage("answering")
        last = torch.isin(input_ids[:, -1].cpu(), self.eos).tolist()
        done = []
        for i, job in enumerate(self.jobs):
            self.ended[i] = self.ended[i] or last[i]
            if self.ended[i]:
                done.append(True)
                continue
            stop = not job.alive() or self.steps >= job.max_new_tokens
            if not stop and job.stops:
                text = self.tokenizer.decode(input_ids[i, self.prompt_len :].tolist(), skip_special_tokens=True)
                stop = any(s in text for s in job.stops)
            done.append(stop)
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def _id_set(ids: Any) -> set[int]:
    if ids is None:
        return set()
    return {int(i) for i in ids} if isinstance(ids, (list, tuple, set)) else {int(ids)}


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
    """Prepare stage + micro-batching model worker around a pipeline (see the module docstring).

    `pipeline` is a ready pipeline or a zero-argument factory (called once, under a lock, on
    first use). `start()` before `submit()`, `close()` when done (the app's lifespan does both)."""

    def __init__(
        self,
        pipeline: Any = None,
        *,
        pipeline_factory: Callable[[], Any] | None = None,
        max_batch: int = 8,
        max_queue: int = 64,
        batch_wait_s: float = 0.02,
        prepare_workers: int = 2,
        metrics: Any = None,
    ) -> None:
        if pipeline is None and pipeline_factory is None:
            raise ValueError("Engine needs a pipeline or a pipeline_factory")
        if max_batch < 1 or max_queue < 1 or prepare_workers < 1:
            raise ValueError("max_batch, max_queue and prepare_workers must be >= 1")
        self._pipeline = pipeline
        self._factory = pipeline_factory
        self._pipeline_lock = threading.Lock()
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.batch_wait_s = batch_wait_s
        self.prepare_workers = prepare_workers
        self.metrics = metrics
        self._cond = threading.Condition()
        self._incoming: deque[Job] = deque()  # admitted, image not opened yet
        self._ready: deque[Job] = deque()  # image opened, waiting for the model
        self._opened = 0  # jobs holding an opened image until they finish (<= max_batch)
        self._preparing = 0
        self._stop = False
        self._threads: list[threading.Thread] = []
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
        """Jobs waiting: for their image to be opened, or for the model."""
        return len(self._incoming) + self._preparing + len(self._ready)

    def start(self) -> Engine:
        with self._cond:
            if self._threads:
                return self
            self._stop = False
            names = [f"uhrbat-prepare-{i}" for i in range(self.prepare_workers)]
            self._threads = [threading.Thread(target=self._prepare_loop, name=n, daemon=True) for n in names]
            self._threads.append(threading.Thread(target=self._model_loop, name="uhrbat-engine", daemon=True))
        for t in self._threads:
            t.start()
        return self

    def close(self, timeout: float = 30) -> None:
        with self._cond:
            self._stop = True
            pending = [*self._incoming, *self._ready]
            self._incoming.clear()
            self._ready.clear()
            self._cond.notify_all()
        for job in pending:
            job.cancel.set()
            _fail(job, RequestCancelled("the server is shutting down"))
        for t in self._threads:
            t.join(timeout)
        self._threads = []

    def submit(self, job: Job) -> Job:
        """Admit a job; raises `ServerBusyError` when `max_queue` jobs are already waiting."""
        with self._cond:
            if self._stop or not self._threads:
                raise ServerBusyError("the server is not running")
            if self.depth >= self.max_queue:
                raise ServerBusyError(f"the request queue is full ({self.max_queue} waiting); retry later")
            job.enqueued_at = time.perf_counter()
            self._incoming.append(job)
            self._gauge()
            self._cond.notify_all()
        job.future.add_done_callback(lambda _f: _release(job))
        return job

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(self.depth)

    # ------------------------------------------------------------------ stage 1: prepare
    def _prepare_loop(self) -> None:
        while True:
            with self._cond:
                while not self._incoming and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                job = self._incoming.popleft()
                self._preparing += 1
            try:
                self._prepare(job)
            finally:
                with self._cond:
                    self._preparing -= 1
                    self._gauge()

    def _prepare(self, job: Job) -> None:
        with self._cond:  # a slot for one more opened image (memory: one batch of them)
            while self._opened >= self.max_batch and not self._stop:
                if not job.alive():
                    return
                self._cond.wait(0.1)
            if self._stop:
                _fail(job, RequestCancelled("the server is shutting down"))
                return
            if not job.alive():
                return
            self._opened += 1
        job.future.add_done_callback(lambda _f: self._close_slot())
        job.set_stage("reading")
        try:
            job.open_image()
        except Exception as e:  # noqa: BLE001  (a bad image fails its own request only)
            _fail(job, e)
            return
        if not job.alive():
            return
        job.set_stage("waiting")
        with self._cond:
            if self._stop:
                _fail(job, RequestCancelled("the server is shutting down"))
                return
            self._ready.append(job)
            self._cond.notify_all()

    def _close_slot(self) -> None:
        with self._cond:
            self._opened -= 1
            self._cond.notify_all()

    # ------------------------------------------------------------------ stage 2: model
    def _take_batch(self) -> list[Job]:
        with self._cond:
            while not self._ready and not self._stop:
                self._cond.wait()
            if self._stop:
                return []
            first = self._ready.popleft()
            key = first.batch_key()
            if self.max_batch > 1 and self.batch_wait_s > 0:
                deadline = time.monotonic() + self.batch_wait_s
                while (
                    sum(j.batch_key() == key for j in self._ready) < self.max_batch - 1
                    and (left := deadline - time.monotonic()) > 0
                    and not self._stop
                ):
                    self._cond.wait(left)
            batch, keep = [first], deque()
            for job in self._ready:
                if len(batch) < self.max_batch and job.batch_key() == key:
                    batch.append(job)
                else:
                    keep.append(job)
            self._ready = keep
            self._gauge()
        return [job for job in batch if job.alive()]

    def _model_loop(self) -> None:
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

    def _run(self, batch: list[Job]) -> None:
        try:
            pipe = self.pipeline()
        except BaseException as e:  # noqa: BLE001  (a failed model load fails these requests, not the worker)
            for job in batch:
                _fail(job, e)
            return
        for job in batch:
            job.set_stage("model")
        tokenizer = pipe.processor.tokenizer
        first = batch[0]
        streamer = RowStreamer(batch, tokenizer) if any(j.on_text for j in batch) else None
        control = RowControl(batch, tokenizer, pipe.model.generation_config.eos_token_id)
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
                progress=BatchProgress(batch),
                **first.generation,
                **first.selection,
            )
        except BatchAbandoned:
            return  # every row already failed with its own reason
        except Exception as e:  # noqa: BLE001  (handed to the requests' futures)
            live = [j for j in batch if not j.future.done()]
            if len(live) > 1 and not (streamer and any(streamer.sent)):
                # One bad request must not fail the others: retry them one by one.
                for job in live:
                    self._run([job])
                return
            for job in live:
                _fail(job, e)
            return
        if self.metrics is not None:
            self.metrics.batch_size.observe(len(batch))
        for job, res in zip(batch, results):
            text, hit = trim_at_stop(res.answer, job.stops)
            length = not hit and len(res.generated_ids) >= job.max_new_tokens  # answer ids, EOS excluded
            done = Completion(
                res,
                text,
                "length" if length else "stop",
                job.source,
                started - job.enqueued_at,
                len(batch),
                job.filename,
            )
            if job.future.done():
                continue  # failed on its own (deadline, client gone) while the batch went on
            if self.metrics is not None:
                self.metrics.observe_result(res, done.queued_s)
            job.future.set_result(done)


def _fail(job: Job, exc: BaseException) -> None:
    if not job.future.done():
        try:
            job.future.set_exception(exc)
        except Exception:  # noqa: BLE001  (set concurrently by another thread: the first one wins)
            pass


def _release(job: Job) -> None:
    """A finished job drops its image handle (spooled bytes) and opened source."""
    if isinstance(job.image, ImageHandle):
        job.image.release()
    job.source = None


__all__ = [
    "BatchAbandoned",
    "BatchProgress",
    "Completion",
    "Engine",
    "Job",
    "RowControl",
    "RowStreamer",
    "trim_at_stop",
]
