"""Start-up of the `uhrbat` command: help, `--version` and usage errors import neither torch nor
transformers (checked through `sys.modules`, not timed: `benchmarks/cli_startup.py` times it),
the console script is the launcher that makes this possible, and a command run through it
still loads and answers (the Auto classes are registered at model load).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib

import pytest
import typer

import uhrbat
from conftest import ASSETS, ROOT

HEAVY = ("torch", "transformers", "numpy", "PIL", "safetensors", "accelerate", "deepspeed", "uhrbat.pipeline")

# Runs the console script's entry point once per case in one interpreter and reports, per case,
# the exit code and the heavy modules imported so far.
_PROBE = r"""
import contextlib, importlib, io, json, sys
module, func = sys.argv[1].split(":")
cases, heavy = json.loads(sys.argv[2]), json.loads(sys.argv[3])
report = []
for args in cases:
    sys.argv = ["uhrbat", *args]
    out = io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            getattr(importlib.import_module(module), func)()
        except SystemExit as e:
            code = e.code
    loaded = [m for m in heavy if m in sys.modules]
    report.append({"args": args, "code": code, "heavy": loaded, "output": out.getvalue()})
print(json.dumps(report))
"""


def console_script() -> str:
    """The `uhrbat` entry point declared in pyproject.toml (what `pip install` generates)."""
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["uhrbat"]


def probe(cases: list[list[str]]) -> list[dict]:
    run = subprocess.run(
        [sys.executable, "-c", _PROBE, console_script(), json.dumps(cases), json.dumps(HEAVY)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def _command_paths() -> list[list[str]]:
    """Every command and subcommand of the app, e.g. ["ask"], ["data", "prepare-sft"]."""
    from uhrbat.cli.main import app

    paths: list[list[str]] = []

    def walk(cmd, prefix: list[str]) -> None:  # noqa: ANN001  (typer's own click types)
        if hasattr(cmd, "list_commands"):
            ctx = cmd.context_class(cmd)
            for name in cmd.list_commands(ctx):
                paths.append([*prefix, name])
                walk(cmd.get_command(ctx, name), [*prefix, name])

    walk(typer.main.get_command(app), [])
    return paths


def test_console_script_is_the_launcher() -> None:
    """pyproject declares the launcher (a top-level module, shipped as a py-module)."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert console_script() == "_uhrbat_launcher:main"
    assert data["tool"]["setuptools"]["py-modules"] == ["_uhrbat_launcher"]
    assert (ROOT / "src" / "_uhrbat_launcher.py").is_file()


def test_help_version_and_usage_errors_import_no_heavy_module() -> None:
    commands = _command_paths()
    assert ["ask"] in commands and ["data", "prepare-sft"] in commands and len(commands) >= 12
    usage_errors = [
        ["nosuch"],
        ["ask"],  # missing IMAGE
        ["ask", "x.png", "q", "--nosuch"],
        ["ask", "x.png", "q", "--selector", "nosuch"],
        ["ask", "x.png", "q", "--clusters", "-1"],
        ["ask", "x.png", "q", "--budgets", "1,a"],
        ["ask", "x.png", "q", "--bands", "x"],
        ["ask", "x.png", "q", "--encode", "half"],
        ["chat", "x.png", "--max-new-tokens", "zero"],
        ["serve", "--port", "abc"],
        ["batch", "--engine", "foo"],
        ["eval", "--benchmark", "xlrs"],  # missing --data
        ["train", "--max-steps", "x"],
    ]
    cases = [["--help"], ["--version"], ["-h"]] + [[*c, "--help"] for c in commands] + usage_errors
    report = probe(cases)
    for row in report:
        assert row["heavy"] == [], f"uhrbat {' '.join(row['args'])} imported {row['heavy']}"
    by_args = {tuple(r["args"]): r for r in report}
    assert by_args[("--version",)]["output"] == f"uhrbat {uhrbat.__version__}\n"
    for c in commands:
        row = by_args[(*c, "--help")]
        assert row["code"] == 0 and "Usage: uhrbat " + " ".join(c) in row["output"], row
    for c in usage_errors:
        row = by_args[tuple(c)]
        assert row["code"] == 2 and "Error: " in row["output"], row


def test_version_in_process() -> None:
    from typer.testing import CliRunner

    from uhrbat.cli.main import app

    r = CliRunner().invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output == f"uhrbat {uhrbat.__version__}\n"
    # one definition: the package metadata's version is read from `uhrbat.__version__`
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["dynamic"]["version"] == {"attr": "uhrbat.__version__"}


def test_package_exports_resolve_lazily() -> None:
    assert uhrbat.UhrBatConfig.__name__ == "UhrBatConfig"
    assert uhrbat.UhrBatPipeline.__name__ == "UhrBatPipeline"
    assert callable(uhrbat.register_auto_classes)
    assert {"UhrBatProcessor", "UhrBatForConditionalGeneration", "UhrBatError"} <= set(dir(uhrbat))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        uhrbat.nope  # noqa: B018


def test_a_command_through_the_launcher_loads_and_answers(tiny_checkpoint) -> None:
    """Through the console script the package skips the Auto registration at import; loading
    the model registers it (the processor's image processor is found through it)."""
    image = str(ASSETS / "aerial" / "neon_yell_1249x1035.png")
    module, func = console_script().split(":")
    code = f"import sys; sys.argv = ['uhrbat'] + sys.argv[1:]; from {module} import {func} as m; m()"
    args = ["ask", image, "How many trees?", "--model", str(tiny_checkpoint), "--budgets", "8,16"]
    args += ["--clusters", "6", "--iters", "3", "--max-new-tokens", "2", "--json"]
    run = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout)
    assert out["question"] == "How many trees?" and out["num_visual_tokens"] == 24
