"""The one row runner of eval and batch (`uhrbat.rowrunner`): which questions share a model call,
per-row isolation (opening, model, per-answer steps) and the abort rule."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from uhrbat.errors import ImageLoadError, PromptError
from uhrbat.rowrunner import ABORT_AFTER, Job, RowRunner, error_message, group_by_scene, hold_back_unexpected


class Recorder:
    """A pipeline stand-in: answers "<question>@<image>", records every call; questions containing
    "boom" raise RuntimeError, "bad" raise PromptError (a UhrBatError)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str]]] = []

    def _answer(self, image, q):
        if "boom" in q:
            raise RuntimeError("boom\nsecond line")
        if "bad" in q:
            raise PromptError("bad prompt")
        return SimpleNamespace(answer=f"{q}@{image}", cache="miss")

    def ask(self, image, question, max_new_tokens=512, **kw):
        self.calls.append(("ask", [question]))
        return self._answer(image, question)

    def ask_batch(self, images, questions, max_new_tokens=512, **kw):
        self.calls.append(("ask_batch", list(questions)))
        return [self._answer(i, q) for i, q in zip(images, questions)]


def _jobs(spec: str) -> list[Job]:
    """'a1 a2 b1 X c1': job <scene><n>; X is a row with a known error."""
    out = []
    for tok in spec.split():
        if tok.startswith("X"):
            out.append(Job(id=tok, question=tok, error="row 3: no question"))
        else:
            out.append(Job(id=tok, question=tok, scene=tok[0]))
    return out


def _run(spec: str, **kw):
    pipe = Recorder()
    runner = RowRunner(pipe, open_scene=lambda job: job.scene.upper(), **kw)
    outs = list(runner.run(_jobs(spec)))
    return pipe.calls, outs


def test_whole_scenes_one_call_per_scene_and_pooled_singles():
    """batch: a scene's questions in one call; one-question scenes pooled batch_size at a time
    (rows of a scene asked back to back even when the list interleaves scenes)."""
    calls, outs = _run("a1 b1 a2 c1 d1 e1", whole_scenes=True, batch_size=2)
    assert calls == [("ask_batch", ["a1", "a2"]), ("ask_batch", ["b1", "c1"]), ("ask_batch", ["d1", "e1"])]
    assert [o.job.id for o in outs] == ["a1", "a2", "b1", "c1", "d1", "e1"]
    assert [o.first for o in outs] == [True, False, True, True, True, True]
    assert outs[0].result.answer == "a1@A" and outs[0].seconds == outs[1].seconds  # one call, shared evenly
    calls, _ = _run("a1 b1 a2", whole_scenes=True, batch_size=1)
    assert calls == [("ask_batch", ["a1", "a2"]), ("ask", ["b1"])]


def test_consecutive_chunks_count_error_rows_as_slots():
    """eval: every batch_size consecutive questions (error rows included) make one call; batch_size
    1 asks one question per call."""
    calls, outs = _run("a1 a2 a3 X1 b1 b2", whole_scenes=False, batch_size=2)
    assert calls == [("ask_batch", ["a1", "a2"]), ("ask", ["a3"]), ("ask_batch", ["b1", "b2"])]
    assert [o.job.id for o in outs] == ["a1", "a2", "X1", "a3", "b1", "b2"]  # a chunk's error row comes first
    calls, _ = _run("a1 a2 b1", whole_scenes=False, batch_size=1)
    assert calls == [("ask", ["a1"]), ("ask", ["a2"]), ("ask", ["b1"])]


def test_group_by_scene_keeps_first_appearance_order():
    groups = group_by_scene(_jobs("a1 b1 X1 a2 c1 b2"))
    assert [[j.id for j in g] for g in groups] == [["a1", "a2"], ["b1", "b2"], ["X1"], ["c1"]]


def test_every_per_row_failure_is_that_rows_error():
    def open_scene(job):
        if job.scene == "z":
            raise ImageLoadError("image not found: z.png")
        return job.scene

    def geojson(out, source):
        if out.job.id == "c1":
            raise ValueError("CRS cannot be transformed")
        out.extra["geo"] = source

    pipe = Recorder()
    runner = RowRunner(pipe, open_scene=open_scene, finish=[("GeoJSON", geojson)], batch_size=1)
    jobs = [*_jobs("a1 X1"), Job("z1", "q", "z"), Job("z2", "q2", "z"), *_jobs("b1 c1"), Job("boom", "boom", "d")]
    outs = {o.job.id: o for o in runner.run(jobs)}
    assert outs["a1"].error is None and outs["a1"].extra == {"geo": "a"}
    assert (outs["X1"].error, outs["X1"].error_kind) == ("row 3: no question", "data")
    assert outs["z1"].error == outs["z2"].error == "ImageLoadError: image not found: z.png"
    assert outs["z1"].error_kind == "image" and outs["z1"].unexpected is None
    # the answer stays, the row is an error named by the failing step
    assert outs["c1"].error == "GeoJSON: ValueError: CRS cannot be transformed" and outs["c1"].error_kind == "output"
    assert outs["c1"].answered and outs["c1"].result.answer == "c1@c"
    # an unexpected model exception: one line, its type, and flagged for the abort rule
    assert outs["boom"].error == "RuntimeError: boom" and outs["boom"].error_kind == "model"
    assert isinstance(outs["boom"].unexpected, RuntimeError) and not outs["boom"].answered
    assert error_message(ValueError("")) == "ValueError"


def test_a_failed_call_is_retried_question_by_question(capsys):
    logged: list[str] = []
    pipe = Recorder()
    runner = RowRunner(pipe, open_scene=lambda j: j.scene, whole_scenes=True, log=logged.append)
    outs = list(runner.run([Job("1", "ok1", "a"), Job("2", "bad one", "a"), Job("3", "ok3", "a")]))
    assert pipe.calls[0] == ("ask_batch", ["ok1", "bad one", "ok3"]) and [c[0] for c in pipe.calls[1:]] == ["ask"] * 3
    assert [o.error for o in outs] == [None, "PromptError: bad prompt", None]
    assert outs[1].unexpected is None  # a UhrBatError is the row's, never the setup's
    assert logged == ["a batch of 3 questions failed (PromptError: bad prompt); answering them one by one"]


def test_the_model_is_loaded_lazily_and_only_when_needed():
    loads: list[int] = []

    def load():
        loads.append(1)
        return Recorder()

    runner = RowRunner(load=load, on_loaded=lambda: loads.append(2))
    assert [o.error for o in runner.run(_jobs("X1 X2"))] == ["row 3: no question"] * 2 and loads == []
    assert [o.result.answer for o in runner.run(_jobs("a1 b1"))] == ["a1@a", "b1@b"] and loads == [1, 2]


# ---------------------------------------------------------------------------------------------- abort rule
def _stream(kinds: str):
    """'u' unexpected failure, 'e' expected error row, 'a' answered."""
    return [SimpleNamespace(i=i, kind=k, exc=RuntimeError(f"x{i}") if k == "u" else None) for i, k in enumerate(kinds)]


def _filter(items, limit=ABORT_AFTER, log=None):
    return hold_back_unexpected(
        iter(items), unexpected=lambda x: x.exc, answered=lambda x: x.kind == "a", limit=limit, log=log
    )


def test_failures_before_the_first_answer_are_held_then_released_in_order():
    items = _stream("ueuua" + "u")
    assert [x.i for x in _filter(items)] == [1, 0, 2, 3, 4, 5]


def test_the_run_stops_when_the_model_never_answers():
    logged: list[str] = []
    out: list[int] = []
    with pytest.raises(RuntimeError, match="x1"):  # the first held-back exception
        for x in _filter(_stream("eu" + "u" * 10), limit=3, log=logged.append):
            out.append(x.i)
    assert out == [0]  # the expected error row was written, the held-back failures were not
    assert logged and "failed on the first 3 question(s)" in logged[0] and "a rerun asks them again" in logged[0]
    with pytest.raises(RuntimeError, match="x0"):  # fewer than the limit, and the run ends without an answer
        list(_filter(_stream("uu")))
    assert [x.i for x in _filter(_stream("ee"))] == [0, 1]
