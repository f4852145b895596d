"""`uhrbat` command-line entry point.

Each command group lives in its own module and registers itself on the shared Typer app
through a `register(app)` function; this file only wires them together and turns typed
errors into one-line messages (a traceback only with `--debug`).
"""

from __future__ import annotations

import importlib
import sys

import typer

from uhrbat.errors import UhrBatError

app = typer.Typer(
    name="uhrbat",
    help="UHR-BAT: ask questions about ultra-high-resolution remote-sensing images under a visual-token budget.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_STATE = {"debug": False}

# Modules that add commands; a missing optional module (e.g. an extra not installed) is skipped.
_COMMAND_MODULES = [
    "uhrbat.cli.ask",
    "uhrbat.cli.convert",
    "uhrbat.cli.eval_cmd",
    "uhrbat.cli.train_cmd",
    "uhrbat.cli.demo_cmd",
]


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")) -> None:
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


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        rc = app(args=argv, standalone_mode=False)
        # Without standalone mode Click returns (not raises) the code of `typer.Exit(n)`.
        if isinstance(rc, int) and rc != 0:
            sys.exit(rc)
    except UhrBatError as e:
        if debug:
            raise
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except (typer.Exit, SystemExit) as e:
        code = getattr(e, "exit_code", None)
        if code is None:
            code = getattr(e, "code", 0)
        sys.exit(code or 0)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(1)
    except Exception as e:  # click usage errors and the like
        import click

        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if debug:
            raise
        typer.echo(f"error: {type(e).__name__}: {e}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
