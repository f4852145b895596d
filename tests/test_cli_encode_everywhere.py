"""Issue 20: `--encode` / `--gate-margin` reach every command that selects tokens (batch, eval, mcp
take the shared selection group like ask, chat, serve and demo), and change what those runs do."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from uhrbat.cli.main import main
from uhrbat.runfiles import read_jsonl

ROOT = Path(__file__).resolve().parents[1]


def _main(*argv: str) -> None:
    try:
        main(list(argv))
    except SystemExit as e:  # click's standalone mode exits 0 on success
        assert e.code in (0, None)


@pytest.mark.parametrize("command", [["batch"], ["eval"], ["mcp"], ["serve"], ["demo"], ["ask"], ["chat"]])
def test_every_selecting_command_takes_the_whole_selection_group(command, capsys) -> None:
    _main(*command, "--help")
    out = capsys.readouterr().out
    for flag in ("--budgets", "--selector", "--kmeans-clusters", "--kmeans-mode", "--encode", "--gate-margin"):
        assert flag in out, f"uhrbat {command[0]} has no {flag}"


def test_batch_gated_topk_answers_like_full_and_records_the_setting(tiny_checkpoint, tmp_path, capsys) -> None:
    """Gated top-k keeps exactly full top-k's tokens (their positions follow the base scale's
    relevance, which both modes encode alike, so this holds on any CPU; the answers are compared in
    tests/test_gated.py, where the encoder's batch invariance on this CPU is probed); the run's
    settings record the encode mode (a rerun with another mode is refused as other settings)."""
    images = ROOT.parent / "shared" / "assets" / "aerial"
    common = ["--images", str(images / "neon_osbs_400.tif"), "--question", "How many trees are there?"]
    common += ["--model", str(tiny_checkpoint), "--budgets", "8,16", "--selector", "topk"]
    common += ["--max-new-tokens", "4", "--no-progress"]
    kept = {}
    for mode in ("full", "gated"):
        out = tmp_path / mode
        _main("batch", *common, "--out", str(out), "--encode", mode, "--geojson-dir", str(tmp_path / f"geo-{mode}"))
        rows, torn = read_jsonl(out / "predictions.jsonl")
        assert torn == 0 and len(rows) == 1 and rows[0]["error"] is None, rows
        assert f'"encode": "{mode}"' in (out / "run.json").read_text()
        (doc,) = [json.loads(p.read_text()) for p in (tmp_path / f"geo-{mode}").glob("*.geojson")]
        kept[mode] = [(f["properties"]["scale"], f["geometry"]) for f in doc["features"]]
    assert kept["gated"] == kept["full"] and len(kept["full"]) == 8 + 16
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # same folder, other encode mode: other settings
        main(["batch", *common, "--out", str(tmp_path / "full"), "--encode", "gated"])
    assert e.value.code == 2 and "encode" in capsys.readouterr().err


def test_eval_records_encode_and_gate_margin(tiny_checkpoint, tmp_path) -> None:
    out = tmp_path / "run"
    _main(
        "eval",
        "--benchmark",
        "xlrs",
        "--data",
        str(ROOT / "examples" / "eval" / "xlrs"),
        "--model",
        str(tiny_checkpoint),
        "--out",
        str(out),
        "--limit",
        "1",
        "--selector",
        "kmeans",
        "--kmeans-clusters",
        "0",
        "--encode",
        "gated",
        "--gate-margin",
        "2",
        "--max-new-tokens",
        "2",
        "--no-progress",
    )
    settings = json.loads((out / "run.json").read_text())
    text = json.dumps(settings)
    assert '"encode": "gated"' in text and '"gate_margin": 2' in text, text
