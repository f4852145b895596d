"""The normaliser and the diff of `benchmarks/compare_outputs.py` (the before/after harness of
issue 19). The capture itself runs every CLI command and a server, so it is not run here."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def co():
    spec = importlib.util.spec_from_file_location("compare_outputs", ROOT / "benchmarks" / "compare_outputs.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_normalise_drops_run_dependent_keys_at_any_depth_and_keeps_the_rest(co):
    row = {
        "id": "b-one",
        "answer": "Seven 1.5",
        "score": 0.0013429374666884542,
        "timings": {"encode": 0.3},
        "seconds": 0.8,
        "latency_s": 1.2,
        "created": 1733,
        "nested": [{"queue_seconds": 0.01, "box_px": [925.0, 1100.0], "timing_decode": 0.1, "batch_size": 1}],
        "metrics": {"runtime/mean_encode_s": 0.2, "runtime/scenes_prepared": 2, "micro": 40.0},
    }
    assert co.normalise(row) == {
        "id": "b-one",
        "answer": "Seven 1.5",  # numbers in answers are never masked
        "score": 0.0013429374666884542,
        "nested": [{"box_px": [925.0, 1100.0], "batch_size": 1}],
        "metrics": {"runtime/scenes_prepared": 2, "micro": 40.0},
    }


def test_normalise_replaces_folders_and_completion_ids_and_masks_only_timed_text(co):
    roots = co.Roots((("/tmp/uhrbat-compare-x1", "<work>"), ("/data/shared", "<shared>")))
    value = {
        "error": "image not found: /data/shared/parity/missing.png",
        "data": "/tmp/uhrbat-compare-x1/XHRBench",
        "id": "chatcmpl-" + "0123456789abcdef" * 2,
        "scene_cache": "2 scenes prepared; estimated time saved 1.5 s (1.54 s: load + tiles)",
        "answer": "1.5 s",
    }
    assert co.normalise(value, roots) == {
        "error": "image not found: <shared>/parity/missing.png",
        "data": "<work>/XHRBench",
        "id": "chatcmpl-<id>",
        "scene_cache": "2 scenes prepared; estimated time saved <num> s (<num> s: load + tiles)",
        "answer": "1.5 s",
    }
    assert co.normalise_log("load 0.00s  tiles 0.73s  (scene cache: miss)\nwrote /data/shared/x", roots) == [
        "load <num>s  tiles <num>s  (scene cache: miss)",
        "wrote <shared>/x",
    ]


def test_normalise_markdown_drops_timing_rows_only(co):
    text = "\n".join(
        [
            "| metric | value |",
            "| micro | 25.00 |",
            "| runtime/mean_latency_s | 1.07 |",
            "| runtime/scenes_prepared | 2 |",
            "- **scene_cache**: estimated time saved 1.5 s",
            "- **limit**: 0.5",
        ]
    )
    assert co.normalise_markdown(text) == [
        "| metric | value |",
        "| micro | 25.00 |",
        "| runtime/scenes_prepared | 2 |",
        "- **scene_cache**: estimated time saved <num> s",
        "- **limit**: 0.5",
    ]


def test_diff_names_the_paths_that_differ(co):
    before = {"a": [1, 2, {"score": 0.1}], "b": "x", "gone": 1, "weird key": True}
    after = {"a": [1, 2, {"score": 0.10000000000000002}, 4], "b": "x", "new": 2, "weird key": 1}
    found = [(p, b, a) for p, b, a in co.diff(before, after)]
    assert [p for p, _, _ in found] == ["$.a[2].score", "$.a[3]", "$.gone", '$["weird key"]', "$.new"]
    assert found[0][1:] == (0.1, 0.10000000000000002)
    assert repr(found[1][1]) == "<absent>" and found[1][2] == 4
    assert found[3][1:] == (True, 1)  # True == 1 in Python, but not the same JSON value
    assert list(co.diff(before, json.loads(json.dumps(before)))) == []
    lines = co.describe_diff(before, after, limit=2)
    assert lines[0] == "  $.a[2].score: before=0.1 after=0.10000000000000002"
    assert lines[-1] == "  ... and 3 more differing value(s)"


def _write(folder: Path, cases: dict[str, dict]) -> Path:
    folder.mkdir()
    for name, doc in cases.items():
        (folder / f"{name}.json").write_text(json.dumps({"case": name, "meta": {}, **doc}))
    return folder


def test_compare_exit_codes_and_report(co, tmp_path, capsys):
    same = {"output": {"answer": "a", "tokens": [1, 2]}, "log": {"stderr": ["x"]}}
    before = _write(tmp_path / "before", {"eval": same, "ask_topk": same, "batch": same})
    identical = _write(tmp_path / "identical", {"eval": same, "ask_topk": same, "batch": same})
    assert co.main(["compare", str(before), str(identical)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "ask_topk: identical",  # in the capture order, not the file names
        "batch: identical",
        "eval: identical",
        "3 of 3 case(s) identical",
    ]

    changed = {"output": {"answer": "b", "tokens": [1, 2]}, "log": {"stderr": ["x"]}}
    log_only = {"output": same["output"], "log": {"stderr": ["y"]}}
    after = _write(tmp_path / "after", {"ask_topk": changed, "batch": log_only})
    assert co.main(["compare", str(before), str(after)]) == 1
    out = capsys.readouterr().out
    assert 'ask_topk: DIFFERS\n  $.answer: before="a" after="b"' in out
    assert "batch: identical (log differs, not compared strictly):" in out
    assert "eval: only in before" in out and "1 of 3 case(s) identical" in out

    logs = _write(tmp_path / "logs", {"ask_topk": same, "batch": log_only, "eval": same})
    assert co.main(["compare", str(before), str(logs)]) == 0
    capsys.readouterr()
    assert co.main(["compare", str(before), str(logs), "--strict-logs"]) == 1
    assert "batch: DIFFERS" in capsys.readouterr().out


def test_case_selection_by_name_or_prefix(co):
    assert co.select_cases("http") == ["http_models", "http_chat", "http_stream", "http_errors"]
    assert co.select_cases("eval,ask_topk") == ["ask_topk", "eval"]
    assert co.select_cases(None) == list(co.CASES)
    with pytest.raises(SystemExit, match="unknown case"):
        co.select_cases("nope")
