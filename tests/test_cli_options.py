"""Shared CLI options (uhrbat.cli.options): defined once, accepted by every command that runs the
model, parsed by one budget parser, validated before anything is loaded. No model needed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from conftest import ASSETS
from uhrbat.cli import options as opt
from uhrbat.cli.main import app, main
from uhrbat.errors import BudgetError
from uhrbat.processing.processing_uhrbat import parse_budgets

AERIAL = str(ASSETS / "aerial" / "neon_yell_1249x1035.png")
SHARED = [
    "--budgets",
    "--selector",
    "--clusters",
    "--iters",
    "--seed",
    "--kmeans",
    "--compat",
    "--device",
    "--dtype",
    "--attn",
    "--vision-tower",
    "--max-new-tokens",
    "--model",
]
runner = CliRunner()


def _commands() -> dict:
    return get_command(app).commands


# ----------------------------------------------------------------------------- one budget parser
@pytest.mark.parametrize(
    "value, expected",
    [
        ("80,320,600,2000", [80, 320, 600, 2000]),
        (" 8 , 16 ", [8, 16]),
        ([8, 0], [8, 0]),
        ((1, "2"), [1, 2]),
    ],
)
def test_parse_budgets_accepts_integers(value, expected) -> None:
    assert parse_budgets(value) == expected


def test_parse_budgets_accepts_numpy_and_tensor_integers() -> None:
    import numpy as np
    import torch

    assert parse_budgets([np.int64(3), torch.tensor(2)], 2) == [3, 2]
    assert parse_budgets(torch.tensor([5, 6]), 2) == [5, 6]


@pytest.mark.parametrize(
    "value, message",
    [
        ("80.0,320", "budget '80.0' is not an integer"),  # integers only: 80.0 is refused everywhere
        ([80.0, 320], "budget 80.0 is not an integer"),
        ([True, 3], "budget True is not an integer"),
        ("8,2.5", "budget '2.5' is not an integer"),
        ("8,x", "budget 'x' is not an integer"),
        ("8,,16", "an empty budget"),
        ("", "budgets are empty"),
        ("8,-1", "budget -1 is negative"),
        ([8, -1], "budget -1 is negative"),
        ("0,0", "are all 0, so the model would see no image"),
        ("1,2,3", "got 3 budgets [1, 2, 3] but the model has 2 scales"),
    ],
)
def test_parse_budgets_rule(value, message) -> None:
    with pytest.raises(BudgetError) as e:
        parse_budgets(value, 2)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_demo_and_server_use_the_one_parser() -> None:
    """No other budget parser is left in the package (the demo, server, eval and training recipe
    call parse_budgets)."""
    src = Path(opt.__file__).resolve().parents[1]
    offenders = []
    for path in src.rglob("*.py"):
        text = path.read_text()
        if "def parse_budget" in text and path.name != "options.py":
            offenders.append(path.name)
        if "def _parse_budgets" in text:
            offenders.append(path.name)
    assert offenders == []


# ----------------------------------------------------------------------------- options defined once
@pytest.mark.parametrize("command", ["ask", "chat", "trace", "eval", "demo"])
def test_every_model_command_accepts_the_shared_options(command) -> None:
    names = {n for p in _commands()[command].params for n in getattr(p, "opts", [])}
    missing = [o for o in SHARED if o not in names]
    assert missing == [], f"{command} lacks {missing}"


@pytest.mark.parametrize("command", ["serve", "batch"])
def test_serve_and_batch_share_the_selection_options(command) -> None:
    cmd = _commands().get(command)
    if cmd is None:
        pytest.skip(f"`uhrbat {command}` is not registered in this checkout")
    names = {n for p in cmd.params for n in getattr(p, "opts", [])}
    for o in ("--budgets", "--selector", "--clusters", "--iters", "--seed", "--kmeans", "--model"):
        assert o in names, f"{command} lacks {o}"


def test_shared_options_have_one_definition() -> None:
    """Each shared option has the same help text and parser in every command (one definition)."""
    seen: dict[str, tuple] = {}
    # The commands that load a UHR-BAT model for inference (train/masks take recipe/SAM options).
    commands = {
        n: c
        for n, c in _commands().items()
        if n in ("ask", "chat", "trace", "eval", "demo", "serve", "batch", "convert")
    }
    assert {"ask", "chat", "trace", "eval", "demo", "convert"} <= set(commands)
    for name, cmd in commands.items():
        for p in cmd.params:
            for o in getattr(p, "opts", []):
                if o in (
                    "--budgets",
                    "--selector",
                    "--clusters",
                    "--iters",
                    "--seed",
                    "--kmeans",
                    "--compat",
                    "--dtype",
                    "--attn",
                    "--vision-tower",
                    "--bands",
                    "--stretch",
                    "--cache-dir",
                ):
                    key = (p.help, p.metavar, str(p.type_descriptor.annotation), p.min, p.max)
                    assert seen.setdefault(o, key) == key, f"{name} {o} differs from another command's"
    assert {"--budgets", "--kmeans", "--compat", "--clusters"} <= set(seen)


def test_help_shows_effective_defaults() -> None:
    r = runner.invoke(app, ["ask", "--help"], terminal_width=200)
    assert r.exit_code == 0
    text = " ".join(r.output.split())
    assert "[default: the checkpoint's: 3000 for the released model" in text
    assert "[default: the checkpoint's: 80,320,600,2000 for the released model]" in text
    assert "[default: 512; x>=1]" in text and "[default: the checkpoint's: fast]" in text
    assert "uhrbat ask [OPTIONS] {IMAGE} {QUESTION}..." in text


# ----------------------------------------------------------------------------- validation before work
@pytest.mark.parametrize(
    "command",
    [
        ["ask", AERIAL, "q"],
        ["chat", AERIAL],
        ["trace", "--image", AERIAL, "--question", "q", "--out", "t.st"],
        ["eval", "--benchmark", "xlrs", "--data", ".", "--out", "o", "--model", "m"],
        ["demo"],
    ],
)
@pytest.mark.parametrize(
    "bad, message",
    [
        (["--budgets", "80.0,320"], "Invalid value for '--budgets': budget '80.0' is not an integer"),
        (["--budgets", "0,0"], "Invalid value for '--budgets': budgets [0, 0] are all 0"),
        (["--kmeans", "slow"], "Invalid value for '--kmeans-mode' / '--kmeans'"),  # old flags are aliases
        (["--kmeans-mode", "slow"], "Invalid value for '--kmeans-mode' / '--kmeans'"),
        (["--compat", "legacy"], "Invalid value for '--compat'"),
        (["--clusters", "-1"], "Invalid value for '--kmeans-clusters' / '--clusters'"),
        (["--kmeans-iters", "0"], "Invalid value for '--kmeans-iters' / '--iters'"),
        (["--max-new-tokens", "0"], "Invalid value for '--max-new-tokens'"),
    ],
)
def test_bad_option_values_are_usage_errors_in_every_command(command, bad, message) -> None:
    r = runner.invoke(
        app, [*command, *bad, "--model", "/nonexistent/model"] if command[0] != "eval" else [*command, *bad]
    )
    assert r.exit_code == 2, r.output
    assert message in r.output and "Usage: " in r.output
    assert "loading" not in r.output  # nothing was loaded


@pytest.mark.parametrize(
    "command",
    [["ask", AERIAL, "q"], ["chat", AERIAL], ["trace", "--image", AERIAL, "--question", "q", "--out", "t.st"]],
)
@pytest.mark.parametrize(
    "bad, message",
    [
        (["--encode", "fast"], "Invalid value for '--encode'"),
        (["--gate-margin", "0"], "Invalid value for '--gate-margin': gate_margin must be a number > 0"),
        (["--gate-margin", "-2.5"], "gate_margin must be a number > 0 (e.g. 16), got -2.5"),
        (["--selector", "random"], "Invalid value for '--selector'"),
    ],
)
def test_encode_and_selector_values_are_usage_errors(command, bad, message) -> None:
    """Gated-encoding options and the registry's selector names are checked while parsing."""
    r = runner.invoke(app, [*command, *bad, "--model", "/nonexistent/model"])
    assert r.exit_code == 2 and message in r.output and "Usage: " in r.output, r.output
    assert "loading" not in r.output


def test_unwritable_outputs_fail_before_loading(tmp_path) -> None:
    cases = [
        (["--explain", str(tmp_path / "missing" / "o.png")], f"folder {tmp_path / 'missing'} does not exist"),
        (["--geojson", str(tmp_path)], "is a directory"),
        (["--geojson", "/proc/uhrbat-kept.geojson"], "cannot write /proc/uhrbat-kept.geojson"),
    ]
    for args, message in cases:
        r = runner.invoke(app, ["ask", AERIAL, "q", "--model", "/nonexistent/model", *args])
        assert r.exit_code == 2 and message in r.output, r.output
        assert "loading" not in r.output
    r = runner.invoke(app, ["trace", "--image", AERIAL, "--question", "q", "--out", str(tmp_path / "no" / "t.st")])
    assert r.exit_code == 2 and "does not exist; create it first" in r.output


def test_check_writable_leaves_nothing_behind(tmp_path) -> None:
    existing = tmp_path / "keep.json"
    existing.write_text("old")
    mtime = existing.stat().st_mtime_ns
    assert opt.check_writable(existing) == existing
    assert existing.read_text() == "old" and existing.stat().st_mtime_ns == mtime
    assert opt.check_writable(tmp_path / "new.png") == tmp_path / "new.png"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.json"]


@pytest.mark.parametrize(
    "question, message",
    [
        ("", "the question is empty"),
        ("   \n ", "the question is empty"),
        ("<image>", "the question is empty"),
        ("how many <image> ships?", "contains an extra '<image>' marker"),
    ],
)
def test_bad_questions_fail_before_loading(question, message) -> None:
    r = runner.invoke(app, ["ask", AERIAL, question, "--model", "/nonexistent/model"])
    assert r.exit_code != 0 and message in str(r.exception)
    assert "loading" not in r.output


def test_second_bad_question_is_named() -> None:
    r = runner.invoke(app, ["ask", AERIAL, "fine?", " ", "--model", "/nonexistent/model"])
    assert "question 2: the question is empty" in str(r.exception)


def test_helpers_build_pipeline_kwargs() -> None:
    assert opt.selection_kwargs([8, 16], None, 0, None, 3, "exact") == {
        "budgets": [8, 16],
        "kmeans_clusters": 0,
        "seed": 3,
        "kmeans_mode": "exact",
    }
    kw = opt.load_kwargs("cpu", "bf16", None, None, "reference", Path("c"))
    assert kw == {
        "device": "cpu",
        "dtype": "bf16",
        "vision_tower": None,
        "attn_implementation": None,
        "compat": "reference",
        "cache_dir": "c",
    }
    assert opt.read_kwargs((4, 3, 2), (1.0, 99.0), 0) == {
        "bands": (4, 3, 2),
        "max_pixels": None,
        "stretch": (1.0, 99.0),
    }
    from uhrbat.io.images import DEFAULT_MAX_PIXELS

    assert opt.DEFAULT_MAX_PIXELS == DEFAULT_MAX_PIXELS


@pytest.mark.parametrize(
    "args, message",
    [
        (["--bands", "4,3"], "give 1 band (grey) or 3 bands"),
        (["--bands", "a,b,c"], "Invalid value for '--bands'"),
        (["--stretch", "98,2"], "0 <= LOW < HIGH <= 100"),
        (["--stretch", "2"], "give two percentiles"),
    ],
)
def test_reader_options_are_checked_at_parse_time(args, message) -> None:
    r = runner.invoke(app, ["ask", AERIAL, "q", "--model", "/nonexistent/model", *args])
    assert r.exit_code == 2 and message in r.output, r.output


# ----------------------------------------------------------------------------- error format (main)
def _main(capsys, *args: str) -> tuple[int, str]:
    """Run the console entry point in-process; (exit code, stderr)."""
    with pytest.raises(SystemExit) as e:
        main(list(args))
    return e.value.code, capsys.readouterr().err


def test_usage_errors_use_clicks_format(capsys) -> None:
    code, err = _main(capsys, "ask", AERIAL, "q", "--bogus")
    assert code == 2
    assert err.startswith("Usage: uhrbat ask [OPTIONS]")
    assert "Error: No such option: --bogus" in err and "NoSuchOption" not in err
    code, err = _main(capsys, "eval", "--kmeans", "fast", "--compat", "reference", "--budgets", "8,16")
    assert code == 2 and "Error: Missing option '--benchmark'" in err  # --kmeans/--compat accepted


def test_debug_traceback_shows_only_project_frames(capsys) -> None:
    code, err = _main(capsys, "--debug", "ask", "missing.png", "q")
    assert code == 2
    lines = err.strip().splitlines()
    assert lines[0].startswith("Traceback") and lines[-1] == "error: image not found: missing.png"
    assert not any("/typer/" in ln or "/click/" in ln for ln in lines), err
    assert "uhrbat/cli/ask.py" in err and len(lines) < 25
    code, err_after = _main(capsys, "ask", "missing.png", "q", "--debug")  # also accepted after the command
    assert code == 2 and err_after == err
    code, err = _main(capsys, "ask", "missing.png", "q")
    assert code == 2 and err.strip() == "error: image not found: missing.png"


def test_console_script_runs() -> None:
    """The installed entry point (a fresh interpreter) prints errors the same way."""
    r = subprocess.run(
        [sys.executable, "-m", "uhrbat.cli.main", "ask", "missing.png", "q"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2 and r.stderr.strip() == "error: image not found: missing.png"


def test_internal_errors_are_one_line_and_never_swallowed(capsys) -> None:
    def boom() -> None:
        raise AttributeError("'tuple' object has no attribute 'georef'")

    app.command("boom-test")(boom)
    try:
        with pytest.raises(SystemExit) as e:
            main(["boom-test"])
        assert e.value.code == 1
        err = capsys.readouterr().err
        assert err.strip() == (
            "error: internal error: AttributeError: 'tuple' object has no attribute 'georef' "
            "(run `uhrbat --debug ...` for the traceback)"
        )
    finally:
        app.registered_commands[:] = [c for c in app.registered_commands if c.name != "boom-test"]


def test_command_modules_are_registered() -> None:
    from uhrbat.cli import main as cli_main

    for name in ("uhrbat.cli.serve_cmd", "uhrbat.cli.batch_cmd", "uhrbat.cli.chat"):
        assert name in cli_main._COMMAND_MODULES
    assert "chat" in _commands()
