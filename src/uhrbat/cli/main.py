"""`uhrbat` command-line entry point.

Each command group lives in its own module and registers itself on the shared Typer app
through a `register(app)` function; this file only wires them together and decides how
failures look:

- usage errors (unknown option, malformed value) are click's own format: the usage line, a
  hint and `Error: ...`, exit code 2;
- a `UhrBatError` (bad input found while running) is one line `error: ...`, exit code 2;
- anything else is a bug: one line `error: internal error: ...` asking for `--debug`, exit 1;
- `--debug` prints the traceback of the project's own frames (click/typer frames dropped).

Start-up: `uhrbat --help`, `uhrbat --version` and usage errors must answer in well under a
second, so nothing here or in the command modules imports torch, transformers or the package's
model code at import time (Typer only needs the commands' signatures); commands import what they
run inside their functions. `tests/test_cli_startup.py` checks this, `benchmarks/cli_startup.py`
times it.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import traceback
from pathlib import Path

import typer

from uhrbat import __version__
from uhrbat.errors import UhrBatError

app = typer.Typer(
    name="uhrbat",
    help="UHR-BAT: ask questions about ultra-high-resolution remote-sensing images under a visual-token budget.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # click's plain help and usage-error format (no boxes, no markup eating "[default: ...]")
    context_settings={"help_option_names": ["-h", "--help"]},
)

_STATE = {"debug": False}

# Modules that add commands; a missing optional module (e.g. an extra not installed) is skipped.
_COMMAND_MODULES = [
    "uhrbat.cli.ask",
    "uhrbat.cli.chat",
    "uhrbat.cli.convert",
    "uhrbat.cli.eval_cmd",
    "uhrbat.cli.train_cmd",
    "uhrbat.cli.demo_cmd",
    "uhrbat.cli.serve_cmd",
    "uhrbat.cli.batch_cmd",
    "uhrbat.cli.mcp_cmd",
]


# Frames from these packages are dropped from `--debug` tracebacks: they are the same for every
# command and hide the project's frames.
def _package_dirs(*names: str) -> tuple[str, ...]:
    dirs = []
    for name in names:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin:
            dirs.append(str(Path(spec.origin).parent))
    return tuple(dirs)


_FRAMEWORK_DIRS = _package_dirs("typer", "click")


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"uhrbat {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="On errors, print the traceback (project frames only)."),
    version: bool = typer.Option(
        False, "--version", help="Print the version and exit.", callback=_print_version, is_eager=True
    ),
) -> None:
    _STATE["debug"] = debug


def _register_all() -> None:
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue
            raise
        module.register(app)


_register_all()


def format_traceback(exc: BaseException) -> str:
    """The traceback of `exc` (and its causes) without click/typer frames."""
    te = traceback.TracebackException.from_exception(exc)
    seen = set()
    node: traceback.TracebackException | None = te
    while node is not None and id(node) not in seen:
        seen.add(id(node))
        kept = [f for f in node.stack if not f.filename.startswith(_FRAMEWORK_DIRS) and f.filename != "<string>"]
        node.stack = traceback.StackSummary.from_list(kept)
        node = node.__cause__ or node.__context__
    return "".join(te.format())


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    args = list(sys.argv[1:] if argv is None else argv)
    # `--debug` is a global option, but `uhrbat ask ... --debug` is what people type: move it to
    # the front (not past a `--`, after which everything is a positional argument).
    head = args[: args.index("--")] if "--" in args else args
    debug = "--debug" in head
    if debug:
        args = ["--debug"] + [a for a in head if a != "--debug"] + args[len(head) :]
    try:
        # Standalone mode: click prints usage errors in its own format and exits (SystemExit).
        app(args=args, prog_name="uhrbat", standalone_mode=True)
    except UhrBatError as e:
        if debug:
            sys.stderr.write(format_traceback(e))
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except Exception as e:  # a bug, not a bad input: say so, never swallow it
        if debug:
            sys.stderr.write(format_traceback(e))
            sys.exit(1)
        typer.echo(
            f"error: internal error: {type(e).__name__}: {e} (run `uhrbat --debug ...` for the traceback)", err=True
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
