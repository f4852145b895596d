"""Where training logs go: the recipe's `report_to`, checked before anything loads.

`report_to` names transformers logging integrations (`tensorboard`, `wandb`, ...), `all` or
`none`. A named integration whose package is missing is a problem reported by
`uhrbat train --dry-run` and a one-line error for a real run (`TrainRecipe.machine_problems`),
never a silent switch to console-only logging. The `[train]` extra installs tensorboard, which
the shipped recipes log to.
"""

from __future__ import annotations

from typing import Any

from uhrbat.errors import ConfigError

__all__ = ["report_to_list", "report_to_problems"]

# integration -> the package that provides it, where its name differs
_PACKAGES = {"azure_ml": "azureml-core", "comet_ml": "comet-ml", "neptune": "neptune", "dagshub": "dagshub"}


def report_to_list(value: Any) -> list[str]:
    """`report_to` as `TrainingArguments` takes it: a list of names (`["none"]` for none)."""
    if value is None:
        return ["none"]
    items = [value] if isinstance(value, str) else list(value)
    if not all(isinstance(v, str) for v in items):
        raise ConfigError(f"recipe: report_to must be a name or a list of names, got {value!r}")
    names = [v.strip() for v in items if v.strip() not in ("", "none")]
    return names or ["none"]


def report_to_problems(value: Any) -> list[str]:
    """One line per integration in `report_to` that is unknown or not installed here."""
    from transformers.integrations.integration_utils import (
        INTEGRATION_TO_CALLBACK,
        get_available_reporting_integrations,
    )

    names = report_to_list(value)
    if names in (["none"], ["all"]):
        return []
    available = set(get_available_reporting_integrations())
    problems = []
    for name in names:
        if name not in INTEGRATION_TO_CALLBACK:
            known = ", ".join(sorted(INTEGRATION_TO_CALLBACK))
            problems.append(f"report_to {name}: not a logging integration ({known}, all or none)")
        elif name not in available:
            package = "uhrbat[train]" if name == "tensorboard" else _PACKAGES.get(name, name)
            problems.append(
                f"report_to {name}: the {name} package is not installed; pip install '{package}', "
                "or log to the console only with --set report_to=none"
            )
    return problems
