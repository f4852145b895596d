"""Run files of `uhrbat eval` and `uhrbat batch` (issues 18.10, 19.5, 23.2, 23.7): the one
corruption policy — refuse, naming the file, the line and the fix, never rewrite or skip —
applied to both runs alike, the one atomic write, run.json with the model compared by identity,
and the progress bar's true rate."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from test_eval_support import (
    FakePipeline,
    fake_pipeline,  # noqa: F401 - the fixture, used by pytestmark
    write_png,
)
from uhrbat.batch import BatchConfig, read_input, run_batch
from uhrbat.errors import ConfigError, RunFileError
from uhrbat.evaluation.runner import EvalConfig, run_eval
from uhrbat.runfiles import JsonlAppender, RowFile, RowProgress, atomic_write, check_run_settings, read_jsonl

pytestmark = pytest.mark.usefixtures("fake_pipeline")


# ---------------------------------------------------------------------------------------------- one eval, one batch
class EvalRun:
    """An eval run over 4 questions on 2 images (the fake pipeline answers what the question says)."""

    name = "eval"
    rows_file = "predictions.rank0-of-1.jsonl"

    def __init__(self, tmp: Path) -> None:
        d = tmp / "ds"
        write_png(d / "a.png")
        write_png(d / "b.png", color=(1, 2, 3))
        rows = [
            {"id": f"q{i}", "images": ["ab"[i % 2] + ".png"], "question": "[[A]]", "options": ["x", "y"], "answer": "A"}
            for i in range(4)
        ]
        (d / "dataset.json").write_text(json.dumps(rows))
        self.data, self.out, self.ids = d, tmp / "run", [r["id"] for r in rows]

    def __call__(self, model: str = "m", **kw):
        return run_eval(EvalConfig(benchmark="rshr", data=self.data, out=self.out, model=model, progress=False, **kw))


class BatchRun:
    """A batch run over the same 4 questions."""

    name = "batch"
    rows_file = "predictions.jsonl"

    def __init__(self, tmp: Path) -> None:
        write_png(tmp / "imgs" / "a.png")
        write_png(tmp / "imgs" / "b.png", color=(1, 2, 3))
        self.ids = [f"q{i}" for i in range(4)]
        lst = tmp / "imgs" / "l.jsonl"
        lst.write_text(
            "".join(
                json.dumps({"id": i, "image": "ab"[k % 2] + ".png", "question": "[[A]]"}) + "\n"
                for k, i in enumerate(self.ids)
            )
        )
        self.list, self.out = lst, tmp / "run"

    def __call__(self, model: str = "m", **kw):
        cfg = BatchConfig(out=self.out, model=model, progress=False, max_new_tokens=4, **kw)
        return run_batch(read_input(self.list), cfg)


@pytest.fixture(params=[EvalRun, BatchRun], ids=["eval", "batch"])
def run(request, tmp_path):
    return request.param(tmp_path)


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


# ---------------------------------------------------------------------------------------------- the policy
def test_a_corrupt_line_mid_file_is_refused_naming_file_line_and_fix(run):
    run()
    rows = run.out / run.rows_file
    lines = _lines(rows)
    rows.write_bytes(lines[0] + b'{"id": "q1", "outp\n' + b"".join(lines[2:]))  # a damaged line 2
    before = rows.read_bytes()
    with pytest.raises(RunFileError) as e:
        run()
    msg = str(e.value)
    assert msg.startswith(f"{rows}:2: not valid JSON") and f"sed -i '2d' {rows}" in msg and "\n" not in msg
    assert rows.read_bytes() == before  # never rewritten, never skipped


@pytest.mark.parametrize("line", [b"[1, 2]\n", b'{"answer": "A"}\n', b"not json at all\n"])
def test_lines_that_are_not_rows_are_refused(run, line):
    run()
    rows = run.out / run.rows_file
    rows.write_bytes(b"".join(_lines(rows)[:2]) + line + b"".join(_lines(rows)[2:]))
    with pytest.raises(RunFileError, match=rf"^{rows}:3: .*delete it \(e\.g\. sed -i '3d'"):
        run()


def test_a_duplicated_answered_line_is_refused_naming_both_lines(run):
    run()
    rows = run.out / run.rows_file
    lines = _lines(rows)
    rows.write_bytes(b"".join(lines) + lines[1])  # a copy of line 2 (an answered row) at the end
    with pytest.raises(RunFileError) as e:
        run()
    rid = json.loads(lines[1])["id"]
    assert f"{rows}:5: id {rid!r} again, already answered on line 2" in str(e.value)
    assert "sed -i '5d'" in str(e.value)


def test_a_garbage_run_json_is_refused_and_kept(run):
    run()
    settings = run.out / "run.json"
    settings.write_text("garbage")
    with pytest.raises(RunFileError, match="run.json is unreadable or corrupt .*never rewritten"):
        run()
    assert settings.read_text() == "garbage"


@pytest.mark.parametrize("name", ["predictions.jsonl", "run.json"])
def test_a_directory_where_a_run_file_belongs_is_refused_up_front(run, name):
    (run.out / name).mkdir(parents=True)
    with pytest.raises(RunFileError, match=f"{run.out / name} is a directory.*move it away"):
        run()
    assert FakePipeline.instances == []  # refused before any work


def test_a_torn_last_line_is_cut_with_a_note_and_its_question_runs_again(run, capsys):
    run()
    rows = run.out / run.rows_file
    lines = _lines(rows)
    rows.write_bytes(b"".join(lines[:3]) + lines[3][:17])  # the kill landed inside the 4th row's write
    run()
    assert f"{rows}: cut a torn last line (17 bytes, no newline)" in capsys.readouterr().err
    got, bad = read_jsonl(rows)
    assert bad == 0 and sorted(r["id"] for r in got) == run.ids


def test_retried_error_rows_are_superseded_by_the_later_row(run):
    """An id may repeat when it retries an error row: the later row wins (and batch compacts its file)."""
    run()
    rows = run.out / run.rows_file
    lines = _lines(rows)
    first = json.loads(lines[0])
    first["error"], first["output" if run.name == "eval" else "answer"] = "RuntimeError: out of memory", None
    rows.write_bytes(json.dumps(first).encode() + b"\n" + b"".join(lines[1:]))
    run(retry_errors=True)
    got = {}
    for r in read_jsonl(run.out / "predictions.jsonl")[0]:
        assert r["id"] not in got  # the final file holds one row per id
        got[r["id"]] = r
    assert got[first["id"]]["error"] is None and sorted(got) == run.ids


def test_the_same_model_folder_given_two_ways_is_the_same_run(run, tmp_path, monkeypatch):
    """Issue 23.7: the model is compared by identity; a folder given relative, absolute or through a
    symlink is one model, another folder is not."""
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "ckpt")
    (tmp_path / "other").mkdir()
    monkeypatch.chdir(tmp_path)
    run(model="ckpt")
    assert json.loads((run.out / "run.json").read_text())["model"] == str(tmp_path / "ckpt")
    run(model=str(tmp_path / "ckpt"))
    run(model="./link")
    for other in ("other", "RL-MIND/UHR-BAT"):
        with pytest.raises(ConfigError, match="different settings \\(model: "):
            run(model=other)


def test_a_run_json_of_an_older_version_with_a_relative_model_still_resumes(tmp_path, monkeypatch):
    (tmp_path / "ckpt").mkdir()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text(json.dumps({"model": "ckpt", "x": 1}))
    check_run_settings(
        tmp_path / "run",
        {"model": str(tmp_path / "ckpt"), "x": 1},
        what="batch",
        normalise={"model": lambda m: str(Path(m).resolve())},
    )
    with pytest.raises(ConfigError, match="holds a batch run with different settings \\(x: 1 != 2\\); rerun"):
        check_run_settings(tmp_path / "run", {"model": "ckpt", "x": 2}, what="batch")


# ---------------------------------------------------------------------------------------------- RowFile, appender
def test_row_file_reads_whole_lines_and_counts_superseded_errors(tmp_path):
    p = tmp_path / "rows.jsonl"
    with JsonlAppender(p) as a:
        a.write({"id": "a", "error": "boom"})
        a.write({"id": 7, "error": None})
        a.write({"id": "a", "error": None})
    with p.open("ab") as f:
        f.write(b'{"id": "b"')
    rf = RowFile(p)
    assert [(n, r["id"]) for n, r in rf.rows()] == [(1, "a"), (2, 7), (3, "a")]
    assert rf.superseded == 1 and rf.torn_bytes == 10 and "10 bytes" in rf.torn_note()
    with JsonlAppender(p) as a:  # the torn tail is cut before the next row
        a.write({"id": "c"})
    assert [r["id"] for _, r in RowFile(p).rows()] == ["a", 7, "a", "c"]
    assert list(RowFile(tmp_path / "missing.jsonl").rows()) == []


def test_tolerant_reader_for_files_we_did_not_write(tmp_path):
    p = tmp_path / "preds.jsonl"
    p.write_bytes(b'{"id": "a"}\nnot json\n[1]\n{"id": "b"}\n{"id": "c", "x')
    problems: list[str] = []
    rows, skipped = read_jsonl(p, problems)
    assert [r["id"] for r in rows] == ["a", "b"] and skipped == 3
    assert [x.split(":")[0] for x in problems] == ["line 2", "line 3", "line 5"]


# ---------------------------------------------------------------------------------------------- atomic write
def test_atomic_write_text_bytes_and_writer(tmp_path):
    old = os.umask(0o022)
    try:
        p = atomic_write(tmp_path / "sub" / "a.txt", "héllo\n")
        assert p.read_text(encoding="utf-8") == "héllo\n"
        assert stat.S_IMODE(p.stat().st_mode) == 0o644  # a normal new file, not the temp file's 0600
        atomic_write(p, b"\x00\x01")
        assert p.read_bytes() == b"\x00\x01"
        atomic_write(p, lambda tmp: Path(tmp).write_bytes(b"from a writer"))
        assert p.read_bytes() == b"from a writer"
    finally:
        os.umask(old)

    def fails(tmp: str) -> None:
        Path(tmp).write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(p, fails)
    assert p.read_bytes() == b"from a writer"  # the old file stands
    assert sorted(x.name for x in p.parent.iterdir()) == ["a.txt"]  # no temporary file left behind
    (tmp_path / "d").mkdir()
    with pytest.raises(IsADirectoryError, match="is a directory"):
        atomic_write(tmp_path / "d", "x")


# ---------------------------------------------------------------------------------------------- progress
class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_progress_rate_is_the_average_since_the_model_loaded():
    """Issue 23.2: 5 s per row in bursts of 4 (a batch of questions) is 0.2 rows/s, not a burst rate;
    loading time and rows done by an earlier run do not count; the rate never reads '?'."""
    clock = Clock()
    bar = RowProgress(False, "x", 20, done=4, get_time=clock)
    with bar:
        clock.t += 30  # loading the model
        bar.start_clock()
        assert bar.rate() == 0.0 and bar.eta() is None and bar.status() == "4/20 rows, 0.00 rows/s, ETA -:--:--"
        for _ in range(2):
            clock.t += 20
            for _ in range(4):  # four rows written in the same instant
                bar.advance()
        assert bar.rate() == pytest.approx(8 / 40) and bar.eta() == pytest.approx(8 / 0.2)
        assert bar.status() == "12/20 rows, 0.20 rows/s, ETA 0:00:40"
        clock.t += 40
        bar.advance(8)
        assert bar.status() == "20/20 rows, 0.20 rows/s, ETA 0:00:00"


def test_progress_bar_draws_the_rate_columns(capsys, monkeypatch):
    """On a terminal (forced here): the bar with the average rate and the ETA."""
    monkeypatch.setenv("FORCE_COLOR", "1")
    monkeypatch.setenv("COLUMNS", "120")
    clock = Clock()
    with RowProgress(True, "batch (local)", 3, get_time=clock) as bar:
        assert bar._progress is not None  # a live bar, not the log line
        clock.t += 10
        bar.advance(3)
    err = capsys.readouterr().err
    assert "batch (local)" in err and "3/3" in err and "0.30 rows/s" in err and "ETA 0:00:00" in err
    assert "? rows/s" not in err and "0.00 rows/s" in err  # before the first row: 0.00, never '?'


def test_progress_in_a_log_is_one_line_never_wrapped(capsys):
    """Issue 23.2: stderr into a file (not a terminal) gets the final state as one plain line; a
    bar drawn for a log used to wrap '0.27 rows/s' onto a second line at 80 columns."""
    clock = Clock()
    description = "mme-realworld-rs rank 0/1"
    with RowProgress(True, description, 3, get_time=clock) as bar:
        clock.t += 5  # loading the model
        bar.start_clock()
        clock.t += 11
        bar.advance(3)
    err = capsys.readouterr().err
    assert err == f"{description} 3/3 rows, 0.27 rows/s, ETA 0:00:00, elapsed 0:00:16\n"
    with RowProgress(False, description, 3, get_time=clock) as bar:
        bar.advance(3)
    assert capsys.readouterr().err == ""  # --no-progress: nothing
    with RowProgress(True, description, 0, get_time=clock):
        pass
    assert capsys.readouterr().err == ""  # nothing left to do (a finished run resumed): no '0/0 rows' line
