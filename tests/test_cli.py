"""The `uhrbat` command line on tiny models: answers, several questions per scene, JSON output,
GeoJSON/overlay files, traces and one-line errors (in-process through the Typer app; the error
format of the console entry point is tested in test_cli_options.py)."""

from __future__ import annotations

import json
import os
import stat

import pytest
from typer.testing import CliRunner

from conftest import ASSETS, PARITY
from uhrbat.cli.main import app

AERIAL = str(ASSETS / "aerial" / "neon_yell_1249x1035.png")
SMALL = ["--budgets", "8,16", "--clusters", "6", "--iters", "3", "--max-new-tokens", "4"]
runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, list(args))


def test_help_lists_commands() -> None:
    r = run("--help")
    assert r.exit_code == 0
    for cmd in ("ask", "chat", "trace", "convert", "eval", "demo"):
        assert f"  {cmd} " in r.output or f"  {cmd}\n" in r.output, cmd


def test_ask_json(tiny_checkpoint) -> None:
    r = run("ask", AERIAL, "How many trees are there?", "--model", str(tiny_checkpoint), "--json", *SMALL)
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert isinstance(out["answer"], str) and out["question"] == "How many trees are there?"
    assert set(out["timings"]) >= {"load", "tiles", "encode", "score", "select", "prefill", "decode"}
    assert out["num_visual_tokens"] == 8 + 16 == len(out["tokens"])
    tok = out["tokens"][0]
    assert set(tok) >= {"scale", "tile", "row", "col", "score", "merged", "box_px"}
    # pixel boxes are really computed (this used to be swallowed: AttributeError -> no boxes)
    boxes = [t["box_px"] for t in out["tokens"] if t["box_px"] is not None]
    assert boxes and all(0 <= b[0] < b[2] <= 1249 and 0 <= b[1] < b[3] <= 1035 for b in boxes)
    assert [t["scale"] for t in out["tokens"]] == sorted(t["scale"] for t in out["tokens"])
    assert "encode" in r.stderr and "scene cache: miss" in r.stderr  # stage timings on stderr
    # the settings that ran, checkpoint defaults filled in (--seed not given: the checkpoint's 0)
    assert "budgets 8,16, selector kmeans (clusters 6, <= 3 iterations, seed 0, fast)" in r.stderr


def test_ask_several_questions_prepares_the_scene_once(tiny_checkpoint) -> None:
    qs = ["How many trees are there?", "Is there a road?", "What is in the corner?"]
    r = run("ask", AERIAL, *qs, "--model", str(tiny_checkpoint), "--json", *SMALL)
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["question"] for row in rows] == qs
    assert [row["cache"] for row in rows] == ["miss", "hit", "hit"]
    assert rows[1]["timings"]["encode"] == 0.0
    timing_lines = [ln for ln in r.stderr.splitlines() if "(scene cache:" in ln]
    assert [ln.split("]")[0] for ln in timing_lines] == ["[1/3", "[2/3", "[3/3"]
    # each answer equals the one a single-question run gives
    one = run("ask", AERIAL, qs[1], "--model", str(tiny_checkpoint), "--json", *SMALL)
    single = json.loads(one.stdout)
    assert single["answer"] == rows[1]["answer"] and single["tokens"] == rows[1]["tokens"]
    plain = run("ask", AERIAL, *qs[:2], "--model", str(tiny_checkpoint), *SMALL)
    assert plain.stdout == f"Q: {qs[0]}\nA: {rows[0]['answer']}\nQ: {qs[1]}\nA: {rows[1]['answer']}\n"


def test_ask_writes_geojson_and_overlay_per_question(tiny_checkpoint, tmp_path) -> None:
    bad = run("ask", AERIAL, "Trees?", "--model", str(tiny_checkpoint), "--geojson", str(tmp_path / "k.geojson"))
    from uhrbat.errors import NotGeoreferencedError  # (`uhrbat` maps it to one line, exit code 2)

    assert isinstance(bad.exception, NotGeoreferencedError) and "--json" in str(bad.exception)
    assert "model loaded" not in bad.output and not (tmp_path / "k.geojson").exists()  # before the model ran
    old = os.umask(0o022)
    try:
        r = run(
            "ask",
            str(ASSETS / "aerial" / "neon_osbs_400.tif"),
            "Trees?",
            "Roads?",
            "--model",
            str(tiny_checkpoint),
            *SMALL,
            "--geojson",
            str(tmp_path / "kept.geojson"),
            "--explain",
            str(tmp_path / "overlay.png"),
        )
    finally:
        os.umask(old)
    assert r.exit_code == 0, r.output
    names = sorted(p.name for p in tmp_path.iterdir())
    # a georeferenced scene's overlays come with a world file and GDAL's CRS sidecar
    overlays = [f"overlay.{i}.{ext}" for i in (1, 2) for ext in ("pgw", "png", "png.aux.xml")]
    assert names == sorted(["kept.1.geojson", "kept.2.geojson", *overlays])
    fc = json.loads((tmp_path / "kept.2.geojson").read_text())
    assert fc["type"] == "FeatureCollection" and fc["question"] == "Roads?" and len(fc["features"]) > 0
    for p in tmp_path.iterdir():  # ordinary files (umask applies), never 0600
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, p


def test_ask_plain_answer_on_stdout_reference_checkpoint() -> None:
    r = run(
        "ask",
        AERIAL,
        "Is there a road?",
        "--model",
        str(PARITY / "uhrbat_tiny"),
        "--budgets",
        "8,16,24,32",
        "--clusters",
        "6",
        "--iters",
        "3",
        "--max-new-tokens",
        "4",
    )
    assert r.exit_code == 0, r.output
    assert r.stdout.endswith("\n") and "error" not in r.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["missing.png", "q"], "image not found: missing.png"),
        ([AERIAL, "q", "--budgets", "8,16,4"], "got 3 budgets [8, 16, 4] but the model has 2 scales"),
        ([AERIAL, "q", "--budgets", "2304,9216"], "context is"),
        ([AERIAL, "two <image> <image>"], "extra '<image>' marker"),
        ([AERIAL, " "], "the question is empty"),
    ],
)
def test_errors_are_typed_one_line(tiny_checkpoint, args, message) -> None:
    from uhrbat.errors import UhrBatError

    r = run("ask", *args, "--model", str(tiny_checkpoint))
    assert r.exit_code != 0
    assert isinstance(r.exception, UhrBatError) and message in str(r.exception), r.output
    assert "\n" not in str(r.exception)


def test_not_an_image_and_missing_checkpoint(tmp_path, tiny_checkpoint) -> None:
    from uhrbat.errors import UhrBatError

    txt = tmp_path / "notes.png"
    txt.write_text("not an image")
    r = run("ask", str(txt), "q", "--model", str(tiny_checkpoint))
    assert isinstance(r.exception, UhrBatError) and "not an image file" in str(r.exception)
    r = run("ask", AERIAL, "q", "--model", str(tmp_path / "nothing"))
    assert isinstance(r.exception, UhrBatError) and "checkpoint folder not found" in str(r.exception)


def test_trace_writes_fixture_names(tiny_checkpoint, tmp_path) -> None:
    from safetensors.torch import load_file

    out = tmp_path / "t.safetensors"
    old = os.umask(0o022)
    try:
        r = run(
            "trace",
            "--model",
            str(tiny_checkpoint),
            "--image",
            AERIAL,
            "--question",
            "Where is the river?",
            "--budgets",
            "8,16",
            "--clusters",
            "6",
            "--iters",
            "3",
            "--seed",
            "7",
            "--kmeans",
            "exact",
            "--compat",
            "reference",
            "--max-new-tokens",
            "3",
            "--out",
            str(out),
        )
    finally:
        os.umask(old)
    assert r.exit_code == 0, r.output
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    t = load_file(str(out))
    for name in (
        "input_ids",
        "attn.base_scale_attention",
        "attn.by_scale.1344",
        "kmeans.672.init_idx",
        "kmeans.1344.labels",
        "select.672.aggregated",
        "select.1344.pos_flat",
        "select.1344.pos_offsets",
        "merged.pre_mlp",
        "merged.post_mlp",
        "final.inputs_embeds",
        "logits.last_prompt",
        "gen.new_token_ids",
    ):
        assert name in t, name
    assert (t["input_ids"] == -200).sum() == 1
    assert t["merged.post_mlp"].shape[0] == 24 and t["gen.new_token_ids"].numel() == 3


def test_cache_dir_reuses_the_scene_across_runs(tiny_checkpoint, tmp_path) -> None:
    args = [
        "ask",
        AERIAL,
        "Is there a road?",
        "--model",
        str(tiny_checkpoint),
        "--json",
        *SMALL,
        "--cache-dir",
        str(tmp_path / "scenes"),
    ]
    first, second = run(*args), run(*args)
    assert first.exit_code == 0 and second.exit_code == 0, first.output + second.output
    a, b = json.loads(first.stdout), json.loads(second.stdout)
    assert (a["cache"], b["cache"]) == ("miss", "disk")
    assert a["answer"] == b["answer"] and a["tokens"] == b["tokens"]
    assert any((tmp_path / "scenes").iterdir())


def test_convert_writes_readable_weights(tmp_path) -> None:
    """safetensors creates files 0600; converted checkpoints follow the umask like any file."""
    old = os.umask(0o022)
    try:
        r = run("convert", str(PARITY / "uhrbat_tiny"), str(tmp_path / "conv"))
    finally:
        os.umask(old)
    assert r.exit_code == 0, r.output
    weights = list((tmp_path / "conv").glob("*.safetensors"))
    assert weights and all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in weights)


def test_ask_shows_each_stage_on_a_terminal(tiny_checkpoint, monkeypatch) -> None:
    """On a terminal `ask` passes a progress callback and shows each stage as it begins; piped
    `--json` gets nothing extra."""
    from contextlib import contextmanager

    import uhrbat.cli.ask as ask_cmd

    assert ask_cmd.stage_text("encode", {"tiles": {672: 4, 1344: 16}}) == "encoding 20 tiles (CLIP + projector)"
    assert ask_cmd.stage_text("group", {"selector": "kmeans"}) == "grouping tokens (kmeans)"
    shown: list[str] = []

    @contextmanager
    def recorder(enabled: bool):
        yield (lambda stage, info: shown.append(ask_cmd.stage_text(stage, info))) if enabled else None

    monkeypatch.setattr(ask_cmd, "live_status", recorder)
    monkeypatch.setattr(ask_cmd, "show_progress", lambda as_json: True)
    r = run("ask", AERIAL, "How many trees are there?", "--model", str(tiny_checkpoint), *SMALL)
    assert r.exit_code == 0, r.output
    assert shown[:3] == ["reading the image", "building the pyramid", "encoding 20 tiles (CLIP + projector)"]
    assert shown[-2:] == ["writing the answer", "done"] and "scoring relevance" in shown
    monkeypatch.undo()

    class Stream:
        def __init__(self, tty: bool) -> None:
            self.tty = tty

        def isatty(self) -> bool:
            return self.tty

    for err, out, as_json, show in [
        (True, True, False, True),
        (True, False, False, True),  # answers piped, a person watches stderr
        (True, False, True, False),  # --json into a pipe: nothing extra
        (False, True, False, False),  # stderr is not a terminal
    ]:
        monkeypatch.setattr(ask_cmd.sys, "stderr", Stream(err))
        monkeypatch.setattr(ask_cmd.sys, "stdout", Stream(out))
        assert ask_cmd.show_progress(as_json) is show, (err, out, as_json)
