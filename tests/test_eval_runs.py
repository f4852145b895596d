"""Run-directory safety and bookkeeping of `uhrbat eval` / `uhrbat score` (issues 8, 9, 14):
the lock, --retry-errors, latest-row-wins merging, scene grouping, logging, run.json, file
modes, and scoring what can be scored."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from test_eval_runner import _main, make_many
from test_eval_support import (
    FakePipeline,
    fake_pipeline,  # noqa: F401 - the fixture, used by pytestmark
    make_xlrs,
    write_png,
)
from uhrbat.errors import ConfigError, RunFileError, RunLockedError
from uhrbat.evaluation.benchmarks import load_benchmark
from uhrbat.evaluation.runner import EvalConfig, run_eval, shard_of
from uhrbat.runfiles import JsonlAppender, RunLock, read_jsonl

pytestmark = pytest.mark.usefixtures("fake_pipeline")


def _cfg(data, out, **kw) -> EvalConfig:
    return EvalConfig(benchmark="rshr", data=data, out=out, model="m", progress=False, **kw)


# ---------------------------------------------------------------------------------------------- runfiles


def test_run_lock_names_the_holder_and_is_released(tmp_path):
    with RunLock(tmp_path, "uhrbat eval"):
        with pytest.raises(RunLockedError) as e:
            with RunLock(tmp_path, "uhrbat batch"):
                pass
        msg = str(e.value)
        assert f"pid {os.getpid()}" in msg and "since" in msg and "another --out" in msg and "\n" not in msg
    with RunLock(tmp_path, "uhrbat eval"):  # released on exit: a later run gets it
        pass


def test_jsonl_appender_cuts_a_torn_tail_and_reader_drops_it(tmp_path):
    p = tmp_path / "rows.jsonl"
    with JsonlAppender(p) as a:
        a.write({"id": "a"})
    with p.open("ab") as f:
        f.write(b'{"id": "b", "outp')  # a write cut by a kill
    problems: list[str] = []
    assert read_jsonl(p, problems) == ([{"id": "a"}], 1) and "torn last line" in problems[0]
    with JsonlAppender(p) as a:
        a.write({"id": "c"})
    assert read_jsonl(p) == ([{"id": "a"}, {"id": "c"}], 0)
    assert read_jsonl(tmp_path / "none.jsonl") == ([], 0)


# ---------------------------------------------------------------------------------------------- lock, retry


def test_second_run_on_the_same_out_is_refused(tmp_path):
    data = make_many(tmp_path, 2)
    out = tmp_path / "run"
    with RunLock(out, "uhrbat eval"):  # another eval (rank 0) is running there
        with pytest.raises(RunLockedError, match=f"in use by uhrbat eval pid {os.getpid()}"):
            run_eval(_cfg(data, out))
    assert not list(out.glob("predictions*"))  # nothing computed twice
    assert run_eval(_cfg(data, out)).n == 2


def test_retry_errors_retries_an_image_missing_at_load_time(tmp_path):
    data = make_many(tmp_path, 3, n_images=3)
    img = data / "images" / "x1.png"
    img.rename(data / "x1.bak")
    out = tmp_path / "run"
    rep = run_eval(_cfg(data, out))
    rows = {r["id"]: r for r in read_jsonl(out / "predictions.jsonl")[0]}
    assert rows["q001"]["error"].startswith("row 1: image not found") and rows["q001"]["error_kind"] == "image"
    assert rep.n_errors == 1
    (data / "x1.bak").rename(img)
    assert run_eval(_cfg(data, out)).n_errors == 1  # a plain resume keeps the error row
    rep = run_eval(_cfg(data, out, retry_errors=True))
    assert rep.n_errors == 0 and rep.per_sample["q001"] is True


# ---------------------------------------------------------------------------------------------- merging


def test_latest_row_wins_over_a_stale_rank_file_of_another_world_size(tmp_path):
    data = make_many(tmp_path, 2)
    out = tmp_path / "run"
    out.mkdir()
    # an earlier 2-rank run left an error row for q001; its file name sorts after the 1-rank file
    stale = out / "predictions.rank0-of-2.jsonl"
    stale.write_text(
        json.dumps({"id": "q001", "output": None, "error": "RuntimeError: CUDA out of memory", "seq": [1, 0]}) + "\n"
    )
    assert run_eval(_cfg(data, out)).per_sample["q001"] is False  # resumed: the error row stands
    rep = run_eval(_cfg(data, out, retry_errors=True))  # now answered, in predictions.rank0-of-1.jsonl
    assert rep.per_sample["q001"] is True and rep.n_errors == 0
    (fresh,) = [r for r in read_jsonl(out / "predictions.rank0-of-1.jsonl")[0] if r["id"] == "q001"]
    assert fresh["error"] is None and fresh["seq"][0] > 1  # a generation above every row already there
    merged = {r["id"]: r for r in read_jsonl(out / "predictions.jsonl")[0]}
    assert merged["q001"]["error"] is None
    assert run_eval(_cfg(data, out)).per_sample["q001"] is True  # and it stays the winner on later runs


# ---------------------------------------------------------------------------------------------- scenes


def test_questions_are_grouped_by_image_and_scenes_are_counted(tmp_path):
    data = make_many(tmp_path, 8, n_images=2)  # images alternate: x0, x1, x0, x1, ...
    out = tmp_path / "run"
    rep = run_eval(_cfg(data, out, batch_size=3))
    (pipe,) = FakePipeline.instances
    names = [Path(p).name for p in pipe.asked]
    assert names == ["x0.png"] * 4 + ["x1.png"] * 4  # each scene's questions back to back
    assert [r["id"] for r in read_jsonl(out / "predictions.jsonl")[0]] == [f"q{i:03d}" for i in range(8)]
    assert rep.metrics["runtime/scenes_prepared"] == 2 and rep.metrics["runtime/scene_cache_hits"] == 6
    assert rep.metrics["runtime/scene_time_saved_s"] == pytest.approx(6 * 0.001)
    assert "2 scenes prepared for 8 answered questions" in rep.meta["scene_cache"]
    # per-sample means: every row holds its own figures
    assert rep.metrics["runtime/mean_decode_s"] == pytest.approx(0.002)
    assert rep.metrics["runtime/mean_encode_s"] == pytest.approx(2 * 0.001 / 8)


def test_shards_keep_each_image_on_one_rank(tmp_path):
    samples = load_benchmark("rshr", make_many(tmp_path, 9, n_images=3))
    shards = [shard_of(samples, r, 2) for r in range(2)]
    assert sorted(s.id for sh in shards for s in sh) == [s.id for s in samples]
    for sh in shards:
        for other in shards:
            if other is not sh:
                assert not {s.images[0].path for s in sh} & {s.images[0].path for s in other}


# ---------------------------------------------------------------------------------------------- failures


def test_batch_failures_are_logged_and_recorded(tmp_path, capsys):
    d = tmp_path / "ds"
    write_png(d / "ok.png")
    rows = [
        {"id": "a", "images": ["ok.png"], "question": "[[A]]", "options": ["x", "y"], "answer": "A"},
        {"id": "b", "images": ["ok.png"], "question": "[[RAISE]]", "options": ["x", "y"], "answer": "A"},
    ]
    (d / "dataset.json").write_text(json.dumps(rows))
    rep = run_eval(_cfg(d, tmp_path / "run", batch_size=2))
    err = capsys.readouterr().err
    assert "a batch of 2 questions failed (RuntimeError: fake model failure); answering them one by one" in err
    assert "b: RuntimeError: fake model failure" in err
    assert rep.per_sample == {"a": True, "b": False}
    row = {r["id"]: r for r in read_jsonl(tmp_path / "run" / "predictions.jsonl")[0]}["b"]
    assert row["error"] == "RuntimeError: fake model failure" and row["error_kind"] == "model"


def test_corrupt_run_json_is_refused_not_overwritten(tmp_path):
    data = make_many(tmp_path, 2)
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text('{"benchmark": "rshr", "mod')
    with pytest.raises(RunFileError, match="run.json is unreadable or corrupt .*never rewritten.*move it away"):
        run_eval(_cfg(data, out))
    assert (out / "run.json").read_text() == '{"benchmark": "rshr", "mod'


def test_report_files_get_normal_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        run_eval(
            EvalConfig(benchmark="xlrs", data=make_xlrs(tmp_path), out=tmp_path / "run", model="m", progress=False)
        )
    finally:
        os.umask(old)
    for name in ("report.json", "report.md", "predictions.jsonl", "run.json"):
        assert stat.S_IMODE((tmp_path / "run" / name).stat().st_mode) == 0o644, name


# ---------------------------------------------------------------------------------------------- uhrbat score


def test_score_skips_bad_lines_and_lists_missing_and_unmatched_ids(tmp_path, capsys):
    data = make_many(tmp_path, 3)
    pred = tmp_path / "p.jsonl"
    pred.write_text(
        '{"id": "q000", "output": "B"}\nnot json\n{"id": "zzz", "output": "B"}\n{"id": "q001", "output": "B"}\n'
    )
    assert _main(["score", "--benchmark", "rshr", "--data", str(data), "--predictions", str(pred)]) == 0
    text = capsys.readouterr().out
    assert "missing predictions (1, scored wrong): q002" in text
    assert "predictions for ids not in the data (1, ignored): zzz" in text
    assert "line 2: invalid JSON skipped" in text
    assert _main(["score", "--benchmark", "rshr", "--data", str(data), "--predictions", str(pred), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["per_sample"] == {"q000": True, "q001": True, "q002": False} and rep["n_errors"] == 1
    assert rep["meta"]["missing_prediction_ids"] == ["q002"]


def test_score_fails_loudly_when_every_row_is_an_error(tmp_path, capsys):
    data = make_many(tmp_path, 2)  # RSHR data scored as MME-RealWorld: no row fits
    pred = tmp_path / "p.jsonl"
    pred.write_text('{"id": "q000", "output": "A"}\n{"id": "q001", "output": "B"}\n')
    assert _main(["score", "--benchmark", "hrbench-4k", "--data", str(data), "--predictions", str(pred)]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith("error: all 2 questions of hrbench-4k are errors") and "--benchmark" in err and "\n" not in err
    )
    wrong_ids = tmp_path / "w.jsonl"
    wrong_ids.write_text('{"id": "x", "output": "A"}\n')
    assert _main(["score", "--benchmark", "rshr", "--data", str(data), "--predictions", str(wrong_ids)]) == 2
    assert "no prediction for any id" in capsys.readouterr().err


def test_eval_refuses_lrs_without_wordnet_before_loading_the_model(tmp_path, monkeypatch):
    from test_eval_support import make_lrs
    from uhrbat.evaluation import wordnet

    monkeypatch.setattr(wordnet, "get_wordnet", lambda: None)
    data, root = make_lrs(tmp_path)
    with pytest.raises(ConfigError, match="wordnet-base"):
        run_eval(EvalConfig(benchmark="lrs-vqa", data=data, images=root, out=tmp_path / "r", model="m", progress=False))
    assert FakePipeline.instances == []
    rep = run_eval(
        EvalConfig(
            benchmark="lrs-vqa",
            data=data,
            images=root,
            out=tmp_path / "r",
            model="m",
            progress=False,
            score_options={"lrs_synonyms": "none"},
        )
    )
    assert "exact match only" in rep.meta["wordnet"]


def test_eval_cli_allow_outside_images(tmp_path, capsys):
    d = tmp_path / "ds"
    write_png(d / "ok.png")
    outside = write_png(tmp_path / "elsewhere" / "o.png")
    rows = [
        {"id": "a", "images": ["ok.png"], "question": "[[A]]", "options": ["x", "y"], "answer": "A"},
        {"id": "b", "images": [str(outside)], "question": "[[A]]", "options": ["x", "y"], "answer": "A"},
    ]
    (d / "dataset.json").write_text(json.dumps(rows))
    base = ["eval", "--benchmark", "rshr", "--data", str(d), "--model", "m", "--no-progress"]
    assert _main([*base, "--out", str(tmp_path / "r1")]) == 0
    r1 = {r["id"]: r for r in read_jsonl(tmp_path / "r1" / "predictions.jsonl")[0]}
    assert "outside the image root" in r1["b"]["error"]
    assert _main([*base, "--out", str(tmp_path / "r2"), "--allow-outside-images"]) == 0
    assert json.loads((tmp_path / "r2" / "report.json").read_text())["n_errors"] == 0


def test_eval_with_the_wrong_benchmark_fails_loudly_after_writing_its_report(tmp_path, capsys):
    data = make_many(tmp_path, 2)  # RSHR rows have no A/B/C/D columns: every HR-Bench row is malformed
    out = tmp_path / "run"
    assert (
        _main(
            [
                "eval",
                "--benchmark",
                "hrbench-4k",
                "--data",
                str(data),
                "--model",
                "m",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: all 2 questions of hrbench-4k are errors") and str(out) in err
    assert json.loads((out / "report.json").read_text())["n_errors"] == 2
    assert FakePipeline.instances == []  # no model was loaded for rows that cannot run


# ---------------------------------------------------------------------------------- day-one friction (issue 23.6)
def test_an_error_row_keeps_its_category_and_options_in_eval_and_score(tmp_path, capsys):
    """A question whose image is missing counts in its own category in `eval` and in `score` alike
    (it was "(no category)" in eval and "color" in score), and is logged on stderr when written."""
    from test_eval_support import make_mme

    data, root = make_mme(tmp_path)
    (root / "remote_sensing" / "0.png").unlink()  # the "color" question's image
    samples = {s.id: s for s in load_benchmark("mme-realworld-rs", data, root)}
    bad = samples["perception/remote_sensing/color/0000"]
    assert bad.error_kind == "image" and bad.category == "color" and set(bad.options) == set("ABCDE")
    out = tmp_path / "run"
    rep = run_eval(EvalConfig(benchmark="mme-realworld-rs", data=data, images=root, out=out, model="m", progress=False))
    err = capsys.readouterr().err
    assert "perception/remote_sensing/color/0000: row 0: image not found" in err
    assert rep.per_category["Perception/color"] == {"n": 1, "correct": 0, "accuracy": 0.0}
    assert "Perception/unknown" not in rep.per_category
    assert (
        _main(
            [
                "score",
                "--benchmark",
                "mme-realworld-rs",
                "--data",
                str(data),
                "--images",
                str(root),
                "--predictions",
                str(out / "predictions.jsonl"),
                "--json",
            ]
        )
        == 0
    )
    scored = json.loads(capsys.readouterr().out)
    assert scored["per_category"] == rep.per_category and scored["headline"] == rep.headline


def test_the_report_table_is_not_wrapped_when_stdout_is_not_a_terminal(tmp_path, capsys):
    data = make_xlrs(tmp_path)
    pred = tmp_path / "p.jsonl"
    pred.write_text("".join(json.dumps({"id": str(100 + i), "output": "B"}) + "\n" for i in range(4)))
    assert _main(["score", "--benchmark", "xlrs", "--data", str(data), "--predictions", str(pred)]) == 0
    lines = capsys.readouterr().out.splitlines()
    # the long category names sit on one line each (a wrapped table would split them)
    assert any("Land use classification/Overall Land use classification" in ln for ln in lines)
    header = next(ln for ln in lines if "weighted_avg" in ln)
    assert "subtask_mean" in header  # both headline columns on one line
    assert any(ln.startswith("weighted_avg: accuracy over all questions") and "UHR-BAT" in ln for ln in lines)
    assert all(len(ln) < 400 for ln in lines)  # and no padding to a huge width
