"""The `uhrbat eval` runner with a fake pipeline: records, batching, resume (also after SIGKILL),
sharding over two processes, `uhrbat score`, and bad inputs through the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_eval_support import (
    HOOK,
    FakePipeline,
    fake_pipeline,  # noqa: F401 - the fixture, used by pytestmark
    make_hrbench,
    make_lrs,
    make_mme,
    make_rshr,
    make_xlrs,
    write_png,
)
from uhrbat.errors import ConfigError
from uhrbat.evaluation.runner import EvalConfig, dist_info, run_eval
from uhrbat.runfiles import read_jsonl

TESTS_DIR = Path(__file__).resolve().parent


pytestmark = pytest.mark.usefixtures("fake_pipeline")


def _ids(path: Path) -> list[str]:
    rows, n_torn = read_jsonl(path)
    assert n_torn == 0
    return [r["id"] for r in rows]


def make_many(tmp: Path, n: int, n_images: int = 1) -> Path:
    """An RSHR dataset.json with n questions (answers cycle through A-D) over n_images images (question i
    shows image i % n_images)."""
    d = tmp / "many"
    for k in range(n_images):
        write_png(d / "images" / f"x{k}.png", color=(10 * k % 256, 120, 30))
    rows = [
        {
            "id": f"q{i:03d}",
            "images": [f"images/x{i % n_images}.png"],
            "question": f"Q{i} [[{'ABCD'[i % 4]}]]",
            "options": ["a", "b", "c", "d"],
            "answer": "ABCD"[(i + (i % 3 == 0)) % 4],
            "category": "COL",
        }
        for i in range(n)
    ]
    (d / "dataset.json").write_text(json.dumps(rows))
    return d


def test_run_writes_records_and_reports(tmp_path):
    out = tmp_path / "run"
    rep = run_eval(
        EvalConfig(
            benchmark="xlrs",
            data=make_xlrs(tmp_path),
            out=out,
            model="fake-model",
            batch_size=2,
            selection={"budgets": [8, 16], "selector": "topk", "seed": 3},
            progress=False,
        )
    )
    assert rep is not None and rep.headline["weighted_avg"] == 100.0 and rep.n == 4
    (pipe,) = FakePipeline.instances
    assert pipe.kwargs == {"device": "cpu", "dtype": None, "budgets": [8, 16], "selector": "topk", "seed": 3}
    assert ("ask_batch", 2) in pipe.calls  # batches of two reach ask_batch
    rows, _ = read_jsonl(out / "predictions.jsonl")
    assert [r["id"] for r in rows] == ["100", "101", "102", "103"]
    r = rows[0]
    assert r["output"] == "B" and r["parsed"] == "B" and r["correct"] is True and r["error"] is None
    assert r["prompt"].startswith("How many ships? [[B]]The choices are listed below:")
    assert r["timings"] == {"encode": 0.001, "decode": 0.002} and r["num_visual_tokens"] == 42
    assert r["latency_s"] is not None
    assert rows[3]["n_images"] == 2  # two images pasted side by side
    report = json.loads((out / "report.json").read_text())
    assert set(report) >= {"benchmark", "n", "n_errors", "headline", "metrics", "per_category", "per_sample"}
    assert report["meta"]["prompt_style"] == "official" and "xlrs_doc_to_text" in report["meta"]["prompt_template"]
    assert report["meta"]["max_new_tokens"] == 64
    md = (out / "report.md").read_text()
    assert "| weighted_avg | subtask_mean |" in md
    assert "- **weighted_avg**: accuracy over all questions" in md and "UHR-BAT publishes" in md
    assert "- **subtask_mean**: unweighted mean of the 13" in md and "DualComp" in md
    assert set(report["meta"]["headline"]) == {"weighted_avg", "subtask_mean"}


@pytest.mark.parametrize(
    "bench,make",
    [("mme-realworld-rs", make_mme), ("rshr", make_rshr), ("hrbench-4k", make_hrbench), ("lrs-vqa", make_lrs)],
)
def test_every_benchmark_runs(tmp_path, bench, make, monkeypatch):
    if bench == "lrs-vqa":  # the official synonym rule needs WordNet: a tiny one in WordNet's own format
        from test_eval_support import make_mini_wordnet

        monkeypatch.setenv("UHRBAT_WORDNET_DIR", str(make_mini_wordnet(tmp_path / "wn")))
    made = make(tmp_path)
    data, images = made if isinstance(made, tuple) else (made, None)
    rep = run_eval(
        EvalConfig(benchmark=bench, data=data, images=images, out=tmp_path / "run", model="m", progress=False)
    )
    assert rep.n == 4 and rep.n_errors == 0
    assert (tmp_path / "run" / "report.md").exists()


def test_limit_then_extend_and_resume_keeps_one_row_per_sample(tmp_path):
    data = make_many(tmp_path, 10)
    out = tmp_path / "run"
    rep = run_eval(EvalConfig(benchmark="rshr", data=data, out=out, model="m", limit=3, progress=False))
    assert rep.n == 3
    rank_file = out / "predictions.rank0-of-1.jsonl"
    # a torn last line (as left by a kill during a write) and a lost row
    lines = rank_file.read_bytes().splitlines(keepends=True)
    rank_file.write_bytes(b"".join(lines[:2]) + b'{"id": "q002", "outp')
    rep = run_eval(EvalConfig(benchmark="rshr", data=data, out=out, model="m", progress=False))
    assert rep.n == 10
    assert _ids(rank_file) == [f"q{i:03d}" for i in range(10)]
    assert _ids(out / "predictions.jsonl") == [f"q{i:03d}" for i in range(10)]
    # nothing left to do: the model is not even loaded
    FakePipeline.instances.clear()
    run_eval(EvalConfig(benchmark="rshr", data=data, out=out, model="m", progress=False))
    assert FakePipeline.instances == []


def test_error_rows_do_not_stop_the_run(tmp_path):
    d = tmp_path / "ds"
    write_png(d / "ok.png")
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    rows = [
        {"id": "a", "images": ["ok.png"], "question": "[[A]]", "options": ["x", "y"], "answer": "A"},
        {"id": "b", "images": ["broken.png"], "question": "[[A]]", "options": ["x", "y"], "answer": "A"},
        {"id": "c", "images": ["ok.png"], "question": "[[RAISE]]", "options": ["x", "y"], "answer": "A"},
        {"id": "d", "images": ["../../etc/passwd"], "question": "[[A]]", "options": ["x", "y"], "answer": "A"},
        {"id": "e", "images": ["ok.png"], "question": "[[B]]", "options": ["x", "y"], "answer": "B"},
    ]
    (d / "dataset.json").write_text(json.dumps(rows))
    rep = run_eval(EvalConfig(benchmark="rshr", data=d, out=tmp_path / "run", model="m", batch_size=4, progress=False))
    assert rep.per_sample == {"a": True, "b": False, "c": False, "d": False, "e": True}
    assert rep.n_errors == 3
    rows_out = {r["id"]: r for r in read_jsonl(tmp_path / "run" / "predictions.jsonl")[0]}
    assert rows_out["b"]["error"].startswith("ImageLoadError")
    assert rows_out["c"]["error"] == "RuntimeError: fake model failure"
    assert "escapes the image root" in rows_out["d"]["error"]


def test_systematic_model_failure_aborts_without_writing_rows(tmp_path, capsys):
    """The abort rule: unexpected model failures with no answer yet are held back; when the model
    never answers (a broken setup) the run stops with the first exception and writes none of them."""
    d = tmp_path / "ds"
    write_png(d / "ok.png")
    rows = [
        {"id": k, "images": ["ok.png"], "question": "[[RAISE]]", "options": ["x", "y"], "answer": "A"}
        for k in ("a", "b", "c")
    ]
    (d / "dataset.json").write_text(json.dumps(rows))
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="fake model failure"):
        run_eval(EvalConfig(benchmark="rshr", data=d, out=out, model="m", progress=False))
    assert _ids(out / "predictions.rank0-of-1.jsonl") == []  # nothing recorded as a wrong answer
    assert not (out / "report.json").exists()
    assert "stopping: the model failed on the first 3 question(s) it was asked and answered none" in (
        capsys.readouterr().err
    )


def test_a_bad_first_row_does_not_stop_the_run(tmp_path):
    """An unexpected failure on the first question only is the row's, not the setup's: once another
    question is answered it is written as that row's error (issue 18: no bad row stops a run)."""
    d = tmp_path / "ds"
    write_png(d / "ok.png")
    rows = [
        {"id": "a", "images": ["ok.png"], "question": "[[RAISE]]", "options": ["x", "y"], "answer": "A"},
        {"id": "b", "images": ["ok.png"], "question": "[[A]]", "options": ["x", "y"], "answer": "A"},
    ]
    (d / "dataset.json").write_text(json.dumps(rows))
    out = tmp_path / "run"
    rep = run_eval(EvalConfig(benchmark="rshr", data=d, out=out, model="m", progress=False))
    assert rep.per_sample == {"a": False, "b": True}
    got = {r["id"]: r for r in read_jsonl(out / "predictions.jsonl")[0]}
    assert got["a"]["error"] == "RuntimeError: fake model failure" and got["a"]["error_kind"] == "model"
    assert [r["id"] for r in read_jsonl(out / "predictions.rank0-of-1.jsonl")[0]] == ["a", "b"]  # benchmark order


def test_settings_change_is_refused(tmp_path):
    data = make_many(tmp_path, 2)
    run_eval(EvalConfig(benchmark="rshr", data=data, out=tmp_path / "run", model="m", progress=False))
    with pytest.raises(ConfigError, match="different settings \\(prompt"):
        run_eval(
            EvalConfig(benchmark="rshr", data=data, out=tmp_path / "run", model="m", prompt="reference", progress=False)
        )


def test_choice_by_logits(tmp_path):
    rep = run_eval(
        EvalConfig(
            benchmark="hrbench-4k",
            data=make_hrbench(tmp_path),
            out=tmp_path / "run",
            model="m",
            choice_by_logits=True,
            progress=False,
        )
    )
    # the fake prefers the last option letter: D is right only for row 2
    assert rep.metrics["logits/overall"] == pytest.approx((50 + 0) / 2)
    assert rep.headline["overall"] == pytest.approx(75.0)
    with pytest.raises(ConfigError, match="multiple-choice"):
        data, root = make_lrs(tmp_path)
        run_eval(
            EvalConfig(
                benchmark="lrs-vqa",
                data=data,
                images=root,
                out=tmp_path / "r2",
                model="m",
                choice_by_logits=True,
                progress=False,
            )
        )


def test_dist_info():
    assert dist_info({}) == (0, 1, 0)
    assert dist_info({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == (3, 4, 1)
    with pytest.raises(ConfigError):
        dist_info({"RANK": "4", "WORLD_SIZE": "4"})


# ----------------------------------------------------------------------------------------------
# subprocesses: SIGKILL + resume, two ranks
# ----------------------------------------------------------------------------------------------


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS_DIR), env.get("PYTHONPATH", "")])
    env["UHRBAT_PIPELINE_CLASS"] = HOOK
    env.update(extra)
    return env


def _cmd(data: Path, out: Path, *more: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "uhrbat.cli.main",
        "eval",
        "--benchmark",
        "rshr",
        "--data",
        str(data),
        "--model",
        "fake",
        "--out",
        str(out),
        "--no-progress",
        *more,
    ]


def test_sigkill_then_resume_gives_exactly_one_row_per_sample(tmp_path):
    n = 12
    data = make_many(tmp_path, n)
    out = tmp_path / "run"
    rank_file = out / "predictions.rank0-of-1.jsonl"
    proc = subprocess.Popen(
        _cmd(data, out), env=_env(UHRBAT_FAKE_DELAY="0.2"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if rank_file.exists() and rank_file.read_bytes().count(b"\n") >= 3:
            break
        if proc.poll() is not None:
            pytest.fail(f"eval exited early: {proc.stderr.read().decode()}")
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = rank_file.read_bytes().count(b"\n")
    assert 3 <= done < n and not (out / "report.json").exists()
    with rank_file.open("ab") as f:  # as if the kill had landed inside a write
        f.write(b'{"id": "q011", "output": "A", "tor')
    res = subprocess.run(_cmd(data, out), env=_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    want = [f"q{i:03d}" for i in range(n)]
    assert _ids(rank_file) == want  # the resumed run did only the missing ones, in order
    assert _ids(out / "predictions.jsonl") == want
    report = json.loads((out / "report.json").read_text())
    assert report["n"] == n and len(report["per_sample"]) == n


def test_two_ranks_shard_and_merge(tmp_path, capsys):
    n = 9
    data = make_many(tmp_path, n, n_images=n)  # one image per question: image groups alternate between ranks
    out = tmp_path / "run"
    procs = [
        subprocess.Popen(
            _cmd(data, out, "--batch-size", "2"),
            env=_env(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (1, 0)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    r0 = _ids(out / "predictions.rank0-of-2.jsonl")
    r1 = _ids(out / "predictions.rank1-of-2.jsonl")
    assert r0 == [f"q{i:03d}" for i in range(0, n, 2)] and r1 == [f"q{i:03d}" for i in range(1, n, 2)]
    assert _ids(out / "predictions.jsonl") == [f"q{i:03d}" for i in range(n)]
    report = json.loads((out / "report.json").read_text())
    assert report["n"] == n and report["meta"]["world_size"] == 2
    # the merged report equals scoring the merged predictions offline
    capsys.readouterr()
    assert (
        _main(
            [
                "score",
                "--benchmark",
                "rshr",
                "--data",
                str(data),
                "--predictions",
                str(out / "predictions.jsonl"),
                "--json",
            ]
        )
        == 0
    )
    offline = json.loads(capsys.readouterr().out)
    assert offline["headline"] == report["headline"] and offline["per_sample"] == report["per_sample"]


# ----------------------------------------------------------------------------------------------
# CLI (in-process)
# ----------------------------------------------------------------------------------------------


def _main(argv: list[str]) -> int:
    from uhrbat.cli.main import main

    try:
        main(argv)
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def test_cli_score_json(tmp_path, capsys):
    data, root = make_mme(tmp_path)
    pred = tmp_path / "pred.jsonl"
    pred.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"id": "perception/remote_sensing/color/0000", "output": "A"},
                {"id": "perception/remote_sensing/count/0001", "output": "The answer is (C)"},
                {"id": "perception/remote_sensing/position/0002", "output": ""},
                {"id": "not-in-benchmark", "output": "A"},
            ]
        )
        + "\n"
    )
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
                str(pred),
                "--json",
            ]
        )
        == 0
    )
    rep = json.loads(capsys.readouterr().out)
    # 2 right ("A"; "(C)"), "" -> "A" wrong for E, the 4th RS question has no prediction.
    assert rep["n"] == 4 and rep["n_errors"] == 1
    assert rep["headline"]["avg"] == pytest.approx(50.0)
    assert rep["meta"]["n_unmatched_predictions"] == 1
    assert all(isinstance(v, bool) for v in rep["per_sample"].values())
    # without --images the images are not needed (nor checked) to score saved outputs
    assert (
        _main(["score", "--benchmark", "mme-realworld-rs", "--data", str(data), "--predictions", str(pred), "--json"])
        == 0
    )
    assert json.loads(capsys.readouterr().out)["per_sample"] == rep["per_sample"]


@pytest.mark.parametrize(
    "argv,msg",
    [
        (["score", "--benchmark", "nope", "--data", "{data}", "--predictions", "{pred}"], "unknown benchmark 'nope'"),
        (
            ["score", "--benchmark", "rshr", "--data", "{tmp}/missing.json", "--predictions", "{pred}"],
            "benchmark data not found",
        ),
        (
            ["score", "--benchmark", "rshr", "--data", "{data}", "--predictions", "{tmp}/nope.jsonl"],
            "predictions file not found",
        ),
        (
            ["eval", "--benchmark", "rshr", "--data", "{data}", "--model", "m", "--out", "{tmp}/o", "--prompt", "x"],
            "prompt style",
        ),
    ],
)
def test_cli_bad_inputs_exit_2_with_one_line(tmp_path, capsys, argv, msg):
    data = make_many(tmp_path, 2)
    pred = tmp_path / "p.jsonl"
    pred.write_text('{"id": "q000", "output": "A"}\n')
    args = [a.format(data=data, pred=pred, tmp=tmp_path) for a in argv]
    assert _main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and msg in err and "\n" not in err


def test_cli_bad_budgets_are_a_usage_error(tmp_path, capsys):
    # shared options (uhrbat.cli.options) are checked while the command line is parsed
    data = make_many(tmp_path, 2)
    assert (
        _main(
            [
                "eval",
                "--benchmark",
                "rshr",
                "--data",
                str(data),
                "--model",
                "m",
                "--out",
                str(tmp_path / "o"),
                "--budgets",
                "a,b",
            ]
        )
        == 2
    )
    assert "Invalid value for '--budgets'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_row_the_prompt_template_cannot_format_is_that_rows_error(tmp_path, monkeypatch):
    from uhrbat.evaluation import prompts

    real = prompts.build_prompt

    def build(spec, sample, style="official"):
        if sample.id == "q001":
            raise KeyError("options")
        return real(spec, sample, style)

    monkeypatch.setattr(prompts, "build_prompt", build)
    rep = run_eval(
        EvalConfig(benchmark="rshr", data=make_many(tmp_path, 3), out=tmp_path / "run", model="m", progress=False)
    )
    assert rep.n == 3 and rep.n_errors == 1
    row = {r["id"]: r for r in read_jsonl(tmp_path / "run" / "predictions.jsonl")[0]}["q001"]
    assert row["error"] == "prompt: KeyError: 'options'" and row["error_kind"] == "data"
