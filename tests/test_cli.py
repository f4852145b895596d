"""The `uhrbat` command line: answers, JSON output, traces and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ASSETS, PARITY

AERIAL = ASSETS / "aerial" / "neon_yell_1249x1035.png"
SMALL = ["--budgets", "8,16", "--clusters", "6", "--iters", "3", "--max-new-tokens", "4"]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "uhrbat.cli.main", *args], capture_output=True, text=True, timeout=300)


def test_help_lists_commands() -> None:
    r = run("--help")
    assert r.returncode == 0
    for cmd in ("ask", "trace", "convert"):
        assert cmd in r.stdout


def test_ask_json(tiny_checkpoint) -> None:
    r = run("ask", str(AERIAL), "How many trees are there?", "--model", str(tiny_checkpoint), "--json", *SMALL)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert isinstance(out["answer"], str)
    assert set(out["timings"]) >= {"load", "tiles", "encode", "score", "select", "prefill", "decode"}
    assert out["num_visual_tokens"] == 8 + 16 == len(out["tokens"])
    tok = out["tokens"][0]
    assert set(tok) >= {"scale", "tile", "row", "col", "score", "merged"}
    assert [t["scale"] for t in out["tokens"]] == sorted(t["scale"] for t in out["tokens"])
    assert "encode" in r.stderr  # stage timings on stderr


def test_ask_plain_answer_on_stdout_reference_checkpoint() -> None:
    r = run("ask", str(AERIAL), "Is there a road?", "--model", str(PARITY / "uhrbat_tiny"),
            "--budgets", "8,16,24,32", "--clusters", "6", "--iters", "3", "--max-new-tokens", "4")
    assert r.returncode == 0, r.stderr
    assert r.stdout.endswith("\n") and "error" not in r.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["missing.png", "q"], "image not found: missing.png"),
        ([str(AERIAL), "q", "--budgets", "8,-1"], "budget -1 is negative"),
        ([str(AERIAL), "q", "--budgets", "8,2.5"], "budget '2.5' is not an integer"),
        ([str(AERIAL), "q", "--budgets", "8,16,4"], "got 3 budgets"),
        ([str(AERIAL), "q", "--budgets", "2304,9216"], "context is"),
        ([str(AERIAL), "two <image> <image>"], "extra '<image>' marker"),
        ([str(AERIAL), "q", "--selector", "random"], "selector must be"),
    ],
)
def test_errors_are_one_line(tiny_checkpoint, args, message) -> None:
    r = run("ask", *args, "--model", str(tiny_checkpoint))
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, r.stderr
    assert "Traceback" not in r.stderr


def test_not_an_image_and_missing_checkpoint(tmp_path, tiny_checkpoint) -> None:
    txt = tmp_path / "notes.png"
    txt.write_text("not an image")
    r = run("ask", str(txt), "q", "--model", str(tiny_checkpoint))
    assert r.returncode != 0 and "not an image file" in r.stderr and "Traceback" not in r.stderr
    r = run("ask", str(AERIAL), "q", "--model", str(tmp_path / "nothing"))
    assert r.returncode != 0 and "checkpoint folder not found" in r.stderr
    r = run("--debug", "ask", str(txt), "q", "--model", str(tiny_checkpoint))
    assert "Traceback" in r.stderr


def test_trace_writes_fixture_names(tiny_checkpoint, tmp_path) -> None:
    from safetensors.torch import load_file

    out = tmp_path / "t.safetensors"
    r = run("trace", "--model", str(tiny_checkpoint), "--image", str(AERIAL), "--question", "Where is the river?",
            "--budgets", "8,16", "--clusters", "6", "--iters", "3", "--seed", "7", "--kmeans", "exact",
            "--compat", "reference", "--max-new-tokens", "3", "--out", str(out))
    assert r.returncode == 0, r.stderr
    t = load_file(str(out))
    for name in ("input_ids", "attn.base_scale_attention", "attn.by_scale.1344", "kmeans.672.init_idx",
                 "kmeans.1344.labels", "select.672.aggregated", "select.1344.pos_flat", "select.1344.pos_offsets",
                 "merged.pre_mlp", "merged.post_mlp", "final.inputs_embeds", "logits.last_prompt", "gen.new_token_ids"):
        assert name in t, name
    assert (t["input_ids"] == -200).sum() == 1
    assert t["merged.post_mlp"].shape[0] == 24 and t["gen.new_token_ids"].numel() == 3
