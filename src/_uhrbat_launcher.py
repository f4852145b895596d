"""Console-script entry point of the `uhrbat` command.

It sits outside the `uhrbat` package on purpose: importing `uhrbat.cli.main` runs
`uhrbat/__init__.py` first, which registers the Auto classes with transformers (importing torch
and transformers, ~3 s). This module is imported before the package and asks it, through
`DEFER_AUTO_REGISTRATION`, to skip that, so that `uhrbat --help`, `uhrbat --version` and usage
errors answer without importing either. Model loading registers the classes itself
(`uhrbat.modeling.loading.load`), so commands that load a model behave as after `import uhrbat`.
"""

from __future__ import annotations

DEFER_AUTO_REGISTRATION = True


def main() -> None:
    from uhrbat.cli.main import main as run

    run()
