"""End to end: `uhrbat eval` with a tiny random-weight checkpoint on a synthetic benchmark in an
official format, then `uhrbat score` on what it wrote. The answers of a random model are
noise; the test checks the plumbing (records, report, resume) with the real pipeline."""

from __future__ import annotations

import json

import pytest

from test_eval_support import make_hrbench
from uhrbat.runfiles import read_jsonl


def _main(argv: list[str]) -> int:
    from uhrbat.cli.main import main

    try:
        main(argv)
    except SystemExit as e:
        return int(e.code or 0)
    return 0


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from uhrbat.testing import make_tiny_checkpoint

    # two pyramid levels (20 tiles) keep the CPU run short
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", scales=[672, 1344], budgets=[8, 16])


def test_eval_end_to_end_with_tiny_model(tmp_path, tiny_checkpoint, monkeypatch, capsys):
    monkeypatch.delenv("UHRBAT_PIPELINE_CLASS", raising=False)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    data = make_hrbench(tmp_path)
    out = tmp_path / "run"
    argv = [
        "eval",
        "--benchmark",
        "hrbench-4k",
        "--data",
        str(data),
        "--model",
        str(tiny_checkpoint),
        "--out",
        str(out),
        "--budgets",
        "4,8",
        "--selector",
        "topk",
        "--seed",
        "0",
        "--device",
        "cpu",
        "--max-new-tokens",
        "3",
        "--batch-size",
        "2",
        "--choice-by-logits",
        "--no-progress",
    ]
    assert _main(argv) == 0, capsys.readouterr().err
    rows, n_torn = read_jsonl(out / "predictions.jsonl")
    assert n_torn == 0 and [r["id"] for r in rows] == ["0", "1", "2", "3"]
    for r in rows:
        assert r["error"] is None, r["error"]
        assert isinstance(r["output"], str)
        assert r["num_visual_tokens"] == 4 + 8
        assert set(r["timings"]) >= {"encode", "decode"}
        assert r["logit_choice"] in "ABCD" and set(r["logprobs"]) == {"A", "B", "C", "D"}
    # per-sample figures under --batch-size 2: a row's stages add up to its own share of the batch's time,
    # not to the whole batch's (which would double the sum)
    assert sum(sum(r["timings"].values()) for r in rows) <= 1.05 * sum(r["latency_s"] for r in rows) + 0.05
    report = json.loads((out / "report.json").read_text())
    assert report["benchmark"] == "hrbench-4k" and report["n"] == 4 and report["n_errors"] == 0
    # the four questions share one embedded image: one scene prepared, three reuses
    assert [r["cache"] for r in rows] == ["miss", "hit", "hit", "hit"]
    assert report["metrics"]["runtime/scenes_prepared"] == 1 and report["metrics"]["runtime/scene_cache_hits"] == 3
    assert set(report["headline"]) == {"overall", "fsp", "fcp"}
    assert "logits/overall" in report["metrics"] and report["meta"]["selection"]["budgets"] == [4, 8]
    assert (out / "report.md").read_text().startswith("# hrbench-4k")

    # rerun: everything is done, the report is rebuilt identically
    capsys.readouterr()
    assert _main(argv) == 0
    assert json.loads((out / "report.json").read_text())["per_sample"] == report["per_sample"]

    # offline scoring of the same outputs gives the same numbers
    capsys.readouterr()
    assert (
        _main(
            [
                "score",
                "--benchmark",
                "hrbench-4k",
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
