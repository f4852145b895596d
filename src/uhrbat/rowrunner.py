"""The one row runner of `uhrbat eval` and `uhrbat batch`: questions in, one `Outcome` per question out.

A `Job` is one question (`question`, the text the model gets) about one scene (`scene`: jobs with
equal keys show the same image). `RowRunner.run(jobs)`:

1. groups the jobs by scene, in order of first appearance;
2. opens each scene once (`open_scene`, the caller's reader: batch's `open_image` with its trust
   level, eval's embedded and multi-image questions);
3. plans the model calls — `whole_scenes=True` (batch): a scene's questions go in one call and
   one-question scenes are pooled `batch_size` at a time; `whole_scenes=False` (eval): every
   `batch_size` consecutive questions make one call, so `--batch-size 1` asks one question per
   `generate` as the official harnesses do. A call of several questions is `ask_batch`; one
   question is `ask`; a failed call is retried question by question to isolate the bad one;
4. runs the caller's per-answer steps (`finish`: building the row, GeoJSON, judging, choice
   log-probabilities) on every answer.

Per-row isolation: whatever one row raises — its image cannot be opened, the model fails on it,
its GeoJSON cannot be built — becomes that row's error (`"Type: message"`, one line, with an
`error_kind`: data, image, model or output; the writer logs it). Nothing a row raises stops the
run, except through the abort rule. A failed call of several questions is logged here (`log`).

**Abort rule** (`hold_back_unexpected`, applied by the writer to the outcome stream, so also on
the Ray driver): an unexpected exception (not a `UhrBatError`) from the model *before it has
answered any question* may be a broken install, checkpoint or device rather than a bad row. Such
rows are held back, not written. The first answer releases them as error rows (it was the rows,
not the setup); if the first `ABORT_AFTER` model failures come with no answer at all, or the run
ends without one, the run stops with the first exception and writes none of them, so a rerun
asks them again.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from uhrbat.errors import UhrBatError

__all__ = ["ABORT_AFTER", "Job", "Outcome", "RowRunner", "error_message", "group_by_scene", "hold_back_unexpected"]

#: Unexpected model failures with no answer yet after which the run stops (see the module doc).
ABORT_AFTER = 5

T = TypeVar("T")


def error_message(e: BaseException) -> str:
    """`"Type: first line of the message"` — the one-line error a row records."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


@dataclass
class Job:
    """One question for the runner.

    id: the row id; question: the text sent to the model; scene: jobs with equal keys show the
    same image (opened once; None: a scene of its own); error / error_kind: why the row cannot run
    at all (known before running, e.g. a malformed list row); item: the caller's own record.
    """

    id: str
    question: str
    scene: Hashable = None
    error: str | None = None
    error_kind: str = "data"
    item: Any = None


@dataclass
class Outcome:
    """What happened to one job.

    result: the pipeline's `AskResult` when the model answered (kept even if `finish` then
    failed); seconds: this question's share of its model call's wall time; error / error_kind:
    data | image | model | output (finish failed after an answer); unexpected: the exception when
    the model raised something other than a `UhrBatError` (the abort rule's input); first: the
    first question of its scene in its model call (it paid for preparing the scene);
    extra: what `finish` stored.
    """

    job: Job
    result: Any = None
    seconds: float | None = None
    error: str | None = None
    error_kind: str | None = None
    unexpected: BaseException | None = None
    first: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def answered(self) -> bool:
        return self.result is not None


def group_by_scene(jobs: Iterable[Job]) -> list[list[Job]]:
    """Jobs grouped by `scene`, groups in order of first appearance (a job with an error or no
    scene key is a group of its own)."""
    groups: dict[Any, list[Job]] = {}
    for i, job in enumerate(jobs):
        key = ("__own__", i) if job.error is not None or job.scene is None else ("scene", job.scene)
        groups.setdefault(key, []).append(job)
    return list(groups.values())


@dataclass
class RowRunner:
    """Answers `Job`s with a pipeline; see the module doc.

    pipe: a pipeline (`ask`, `ask_batch` returning `AskResult`s), or None with `load`, a function
    that loads it at the first model call (never, if no job reaches the model); on_loaded: called
    after `load`. open_scene(job) -> the image argument of the pipeline. ask_kwargs: selection and
    generation options for every call. finish: per-answer steps `(label, step(outcome, source))`
    run in order, each filling `outcome.extra`; the first that raises makes the row an error
    named by its label ("GeoJSON: ...") and skips the rest. log: where failed calls of several
    questions are reported as they happen (error rows are the writer's to log).
    """

    pipe: Any = None
    open_scene: Callable[[Job], Any] = lambda job: job.scene
    max_new_tokens: int = 512
    ask_kwargs: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 1
    whole_scenes: bool = True
    finish: Sequence[tuple[str | None, Callable[[Outcome, Any], None]]] = ()
    load: Callable[[], Any] | None = None
    on_loaded: Callable[[], None] | None = None
    log: Callable[[str], None] | None = None

    def _pipe(self) -> Any:
        if self.pipe is None:
            if self.load is None:
                raise ValueError("RowRunner needs a pipeline (pipe=) or a loader (load=)")
            self.pipe = self.load()
            if self.on_loaded is not None:
                self.on_loaded()
        return self.pipe

    def _note(self, text: str) -> None:
        if self.log is not None:
            self.log(text)

    @staticmethod
    def _error(job: Job, message: str, kind: str, unexpected: BaseException | None = None) -> Outcome:
        return Outcome(job, error=message, error_kind=kind, unexpected=unexpected)

    # ------------------------------------------------------------------------------------ model calls
    def _finished(self, job: Job, source: Any, result: Any, seconds: float, first: bool) -> Outcome:
        out = Outcome(job, result=result, seconds=seconds, first=first)
        for label, step in self.finish:
            try:
                step(out, source)
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as e:  # noqa: BLE001 - per-row isolation: the answer stays, the row is an error
                out.error = f"{label}: {error_message(e)}" if label else error_message(e)
                out.error_kind = "output"
                break
        return out

    def _one(self, job: Job, source: Any) -> Iterator[Outcome]:
        t = time.perf_counter()
        try:
            result = self._pipe().ask(source, job.question, max_new_tokens=self.max_new_tokens, **self.ask_kwargs)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:  # noqa: BLE001 - per-row isolation
            yield self._error(job, error_message(e), "model", None if isinstance(e, UhrBatError) else e)
            return
        yield self._finished(job, source, result, time.perf_counter() - t, True)

    def _call(self, items: Sequence[tuple[Job, Any]]) -> Iterator[Outcome]:
        """One model call for `items` ((job, opened scene) pairs); on failure, one by one."""
        if not items:
            return
        if len(items) == 1:
            yield from self._one(*items[0])
            return
        t = time.perf_counter()
        results: list[Any] | None
        try:
            results = list(
                self._pipe().ask_batch(
                    [s for _, s in items],
                    [j.question for j, _ in items],
                    max_new_tokens=self.max_new_tokens,
                    **self.ask_kwargs,
                )
            )
            if len(results) != len(items):
                self._note(
                    f"ask_batch returned {len(results)} answers for {len(items)} questions; answering them one by one"
                )
                results = None
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:  # noqa: BLE001 - isolate the failing question below
            self._note(f"a batch of {len(items)} questions failed ({error_message(e)}); answering them one by one")
            results = None
        if results is None:
            for job, source in items:
                yield from self._one(job, source)
            return
        share = (time.perf_counter() - t) / len(items)  # one call: each question gets an equal share
        seen: set[Any] = set()
        for (job, source), result in zip(items, results, strict=True):
            first = job.scene not in seen
            seen.add(job.scene)
            yield self._finished(job, source, result, share, first)

    # ------------------------------------------------------------------------------------ scheduling
    def run(self, jobs: Iterable[Job]) -> Iterator[Outcome]:
        """One `Outcome` per job, as each finishes (see the module doc for the order of calls)."""
        size = max(1, int(self.batch_size))
        pending: list[tuple[Job, Any]] = []
        slots = 0  # whole_scenes=False: questions (error rows included) since the last call

        def slot(n: int = 1) -> Iterator[Outcome]:
            nonlocal slots, pending
            slots += n
            if slots >= size:
                ready, pending, slots = pending, [], 0
                yield from self._call(ready)

        for group in group_by_scene(jobs):
            head = group[0]
            if head.error is not None:
                yield self._error(head, head.error, head.error_kind)
                if not self.whole_scenes:
                    yield from slot()
                continue
            try:
                source = self.open_scene(head)
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as e:  # noqa: BLE001 - missing / corrupt / oversized / refused: an error row per question
                msg = error_message(e)
                for job in group:
                    yield self._error(job, msg, "image")
                    if not self.whole_scenes:
                        yield from slot()
                continue
            if not self.whole_scenes:
                for job in group:
                    pending.append((job, source))
                    yield from slot()
            elif len(group) > 1:
                yield from self._call([(job, source) for job in group])
            elif size > 1:
                pending.append((head, source))
                if len(pending) >= size:
                    ready, pending = pending, []
                    yield from self._call(ready)
            else:
                yield from self._one(head, source)
        yield from self._call(pending)


def hold_back_unexpected(
    items: Iterable[T],
    *,
    unexpected: Callable[[T], BaseException | None],
    answered: Callable[[T], bool],
    limit: int = ABORT_AFTER,
    log: Callable[[str], None] | None = None,
) -> Iterator[T]:
    """The abort rule (module doc) over a stream of outcomes (or rows built from them)."""
    held: list[T] = []
    ok = False

    def stop() -> BaseException:
        if log is not None:
            log(
                f"stopping: the model failed on the first {len(held)} question(s) it was asked and answered none "
                "(a broken install, checkpoint or device?); nothing was written for them, a rerun asks them again"
            )
        first = unexpected(held[0])
        assert first is not None
        return first

    for it in items:
        if ok:
            yield it
        elif answered(it):
            ok = True
            yield from held
            held.clear()
            yield it
        elif unexpected(it) is not None:
            held.append(it)
            if len(held) >= limit:
                raise stop()
        else:
            yield it
    if held:
        raise stop()
