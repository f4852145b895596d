"""Training logs go where the recipe says (`report_to`): the `[train]` extra installs what the
shipped recipes log to, a real run writes TensorBoard events, and a logger that is not installed
(or not known) is a dry-run problem and a one-line error before anything loads, never a silent
switch to console-only logging."""

from __future__ import annotations

import importlib.util
import re
import tomllib

import pytest
import yaml

from conftest import ROOT
from uhrbat.errors import ConfigError
from uhrbat.training.reporting import report_to_list, report_to_problems

RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
# transformers integration -> the distribution that provides it
PACKAGE_OF = {"tensorboard": "tensorboard"}


def _train_extra() -> set[str]:
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["train"]
    return {re.split(r"[<>=!~\[;]", req, maxsplit=1)[0].strip() for req in extra}


def test_train_extra_installs_what_the_shipped_recipes_log_to() -> None:
    assert RECIPES, "no shipped recipes found"
    extra = _train_extra()
    for path in RECIPES:
        names = report_to_list(yaml.safe_load(path.read_text()).get("report_to", "tensorboard"))
        for name in names:
            if name != "none":
                assert PACKAGE_OF.get(name, name) in extra, f"{path.name} logs to {name}, not in the [train] extra"
        assert report_to_problems(names) == [], path.name  # and it is installed here


def test_report_to_list() -> None:
    assert report_to_list(None) == ["none"]
    assert report_to_list("none") == ["none"]
    assert report_to_list("tensorboard") == ["tensorboard"]
    assert report_to_list(["tensorboard", "none", " "]) == ["tensorboard"]
    with pytest.raises(ConfigError, match="report_to must be a name or a list of names"):
        report_to_list([1])


@pytest.fixture
def without_tensorboard(monkeypatch: pytest.MonkeyPatch) -> None:
    """This interpreter as if neither tensorboard nor tensorboardX were installed."""
    real = importlib.util.find_spec
    hidden = ("tensorboard", "tensorboardX")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in hidden else real(name, *a))


def _shipped(*args: str) -> list[str]:
    return ["train", "--config", str(ROOT / "recipes" / "uhrbat-sft.yaml"), "--deepspeed", "none", *args]


def test_dry_run_of_the_shipped_recipe(capsys: pytest.CaptureFixture) -> None:
    from uhrbat.cli.main import main

    with pytest.raises(SystemExit) as e:
        main(_shipped("--dry-run"))
    assert e.value.code == 0
    out = capsys.readouterr()
    assert '"report_to": "tensorboard"' in out.out and out.err == ""


def test_missing_logger_is_a_problem_not_a_fallback(without_tensorboard, capsys, tmp_path) -> None:
    from uhrbat.cli.main import main

    line = (
        "report_to tensorboard: the tensorboard package is not installed; pip install 'uhrbat[train]', "
        "or log to the console only with --set report_to=none"
    )
    with pytest.raises(SystemExit) as e:
        main(_shipped("--dry-run"))
    assert e.value.code == 0 and capsys.readouterr().err == f"will not run on this machine: {line}\n"
    # a real run stops with that line before loading anything (the recipe's model does not exist)
    with pytest.raises(SystemExit) as e:
        main(_shipped("--output-dir", str(tmp_path / "run")))
    assert e.value.code == 2 and capsys.readouterr().err == f"error: {line}\n"
    assert not (tmp_path / "run").exists()
    # console-only logging is a choice the recipe can make
    with pytest.raises(SystemExit) as e:
        main(_shipped("--dry-run", "--set", "report_to=none"))
    assert e.value.code == 0 and capsys.readouterr().err == ""


def test_unknown_logger_is_named(capsys) -> None:
    from uhrbat.cli.main import main

    with pytest.raises(SystemExit) as e:
        main(_shipped("--dry-run", "--set", "report_to=tensorbored"))
    assert e.value.code == 0
    err = capsys.readouterr().err
    assert err.startswith("will not run on this machine: report_to tensorbored: not a logging integration (")
    assert "tensorboard" in err and "wandb" in err


def test_a_run_logs_to_tensorboard(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two steps of a tiny model with `report_to: tensorboard` write the losses as TensorBoard
    scalars under the output folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from test_train import BUDGETS, SCALES, _recipe
    from uhrbat.training.testing import make_tiny_training_setup
    from uhrbat.training.trainer import run_training

    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    setup = make_tiny_training_setup(tmp_path / "setup", n=2, scales=SCALES, budgets=BUDGETS)
    out = tmp_path / "run"
    recipe = _recipe(setup, out, max_steps=2, report_to="tensorboard")
    res = run_training(recipe)
    events = sorted(out.glob("runs/*/events.out.tfevents.*"))
    assert len(events) == 1, list(out.rglob("*"))
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    logged = [(h["step"], h["loss"]) for h in res.log_history if "loss" in h]
    assert len(logged) == 2
    scalars = acc.Scalars("train/loss")
    assert [e.step for e in scalars] == [step for step, _ in logged] == [1, 2]
    assert [e.value for e in scalars] == pytest.approx([loss for _, loss in logged], rel=1e-6)
