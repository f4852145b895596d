"""The one options vocabulary (`uhrbat.options`): defined once, validated once, the same names in
Python, `generate`/`forward`, the CLI, chat and the README's table. No model needed."""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.main import get_command

from uhrbat.errors import BudgetError, ConfigError
from uhrbat.options import (
    DEFAULT_GATE_MARGIN,
    GenerationOptions,
    ReadOptions,
    ResolvedSelection,
    SelectionOptions,
    field_flags,
    options_table,
)

README = Path(__file__).resolve().parents[1] / "README.md"
CONFIG = SimpleNamespace(
    budgets=[80, 320], scales=[672, 1344], selector="kmeans", kmeans_clusters=None, kmeans_iters=10,
    kmeans_mode="fast", seed=0,
)  # fmt: skip


def test_resolution_fills_the_checkpoint_values_once() -> None:
    given = SelectionOptions.of(budgets="8,16", kmeans_clusters=0)
    assert given.given() == {"budgets": [8, 16], "kmeans_clusters": 0}
    r = given.resolve(CONFIG)
    assert isinstance(r, ResolvedSelection) and r.resolve(CONFIG) is r  # resolved once, not again
    assert (r.budgets, r.selector, r.kmeans_iters, r.kmeans_mode, r.seed) == ((8, 16), "kmeans", 10, "fast", 0)
    assert (r.encode, r.gate_margin) == ("full", DEFAULT_GATE_MARGIN)
    assert r.clusters(16) == 16 and SelectionOptions.of(kmeans_clusters=5).resolve(CONFIG).clusters(16) == 5
    assert SelectionOptions().resolve(CONFIG).budgets == (80, 320)
    with pytest.raises(BudgetError, match="got 3 budgets .* the model has 2 scales"):
        SelectionOptions.of(budgets=[1, 2, 3]).resolve(CONFIG)
    assert given.updated(seed=4, selector=None).given() == {"budgets": [8, 16], "kmeans_clusters": 0, "seed": 4}
    with pytest.raises(ValueError, match="frozen"):  # options never change under a running request
        given.seed = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(budgets="8,x"), BudgetError, "budget 'x' is not an integer"),
        (dict(budgets=[0, 0]), BudgetError, "are all 0"),
        (dict(selector="random"), ConfigError, "one of kmeans, segments, topk, divprune, dpp, got 'random'"),
        (dict(kmeans_clusters=-1), ConfigError, "kmeans_clusters must be >= 0 (0 = the scale's budget), got -1"),
        (dict(kmeans_clusters=2.5), ConfigError, "kmeans_clusters must be an integer, got 2.5"),
        (dict(kmeans_iters=True), ConfigError, "kmeans_iters must be an integer, got True"),
        (dict(kmeans_iters=0), ConfigError, "kmeans_iters must be >= 1"),
        (dict(kmeans_mode="slow"), ConfigError, "kmeans_mode must be one of fast, exact, got 'slow'"),
        (dict(encode="fast"), ConfigError, "encode must be one of full, gated, got 'fast'"),
        (dict(gate_margin=0), ConfigError, "gate_margin must be a number > 0"),
        (dict(gate_margin=float("nan")), ConfigError, "gate_margin must be a number > 0"),
        (dict(gate_margin="2"), ConfigError, "gate_margin must be a number > 0"),
        (dict(budget=[8, 16]), ConfigError, "unknown option 'budget'; did you mean 'budgets'?"),
    ],
)
def test_bad_values_are_one_line_errors(kwargs, error, message) -> None:
    with pytest.raises(error) as e:
        SelectionOptions.of(**kwargs)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_generation_and_reading_options() -> None:
    with pytest.raises(BudgetError, match="max_new_tokens must be an integer >= 1, got 0"):
        GenerationOptions.of(max_new_tokens=0)
    streamer = object()  # other keywords pass through to transformers unchanged
    assert GenerationOptions.of(max_new_tokens=3, streamer=streamer, num_beams=2).generate_kwargs() == {
        "max_new_tokens": 3,
        "num_beams": 2,
        "streamer": streamer,
    }
    with pytest.raises(ConfigError, match="unknown option 'kmeans_cluster'; did you mean 'kmeans_clusters'"):
        GenerationOptions.of(kmeans_cluster=3)  # a typo would otherwise reach transformers' generate
    r = ReadOptions.of(bands="4,3,2", stretch="1,99", max_pixels=0)
    assert r.open_kwargs() == {"bands": (4, 3, 2), "stretch": (1.0, 99.0), "max_pixels": None}
    with pytest.raises(ConfigError, match="give 1 band"):
        ReadOptions.of(bands=[1, 2])
    from uhrbat.io import images

    assert ReadOptions().stretch == images.DEFAULT_STRETCH and ReadOptions().max_pixels == images.DEFAULT_MAX_PIXELS


def test_readme_option_table_is_the_vocabulary() -> None:
    """The README's table is generated from the models (`options_table()`); edit the models, then
    paste the new table."""
    assert options_table() in README.read_text(), "README option table is stale; paste uhrbat.options.options_table()"
    for name in SelectionOptions.model_fields:
        assert f"| `{name}` |" in options_table()


def test_every_name_is_the_same_in_python_generate_cli_and_chat() -> None:
    from uhrbat.cli.chat import ALIASES, SETTINGS
    from uhrbat.cli.main import app
    from uhrbat.modeling.modeling_uhrbat import UhrBatForConditionalGeneration

    selection = list(SelectionOptions.model_fields)
    for fn in (UhrBatForConditionalGeneration.forward, UhrBatForConditionalGeneration.generate):
        assert set(selection) <= set(inspect.signature(fn).parameters), fn.__name__
    chat_fields = {field for field, _, _ in SETTINGS.values()}
    assert set(selection) | {"max_new_tokens"} == chat_fields
    assert {"clusters": "kmeans-clusters", "iters": "kmeans-iters", "kmeans": "kmeans-mode"} == ALIASES
    for command in ("ask", "chat", "trace"):
        flags = {o for p in get_command(app).commands[command].params for o in getattr(p, "opts", [])}
        for name in selection:
            assert set(field_flags(SelectionOptions, name)) <= flags, (command, name)
        assert {"--clusters", "--iters", "--kmeans"} <= flags  # the old names still work


def test_cli_aliases_parse_to_the_same_options() -> None:
    from uhrbat.cli import options as opt

    seen = {}

    @opt.shared("selection")
    def probe(*, opts: opt.Shared) -> None:
        seen["selection"] = opts.selection

    import typer
    from typer.testing import CliRunner

    app = typer.Typer()
    app.command()(probe)
    runner = CliRunner()
    out = []
    old = ["--clusters", "5", "--iters", "2", "--kmeans", "exact"]
    new = ["--kmeans-clusters", "5", "--kmeans-iters", "2", "--kmeans-mode", "exact"]
    for args in (old, new):
        r = runner.invoke(app, [*args, "--encode", "gated", "--gate-margin", "2.5"])
        assert r.exit_code == 0, r.output
        out.append(dict(seen["selection"]))
    assert (
        out[0]
        == out[1]
        == {
            "kmeans_clusters": 5,
            "kmeans_iters": 2,
            "kmeans_mode": "exact",
            "encode": "gated",
            "gate_margin": 2.5,
        }
    )


def test_options_module_needs_no_torch() -> None:
    """`uhrbat.options` and the selector registry import nothing that imports torch at module
    level (the CLI builds `--help` from them)."""
    from test_structure import import_graph

    graph = import_graph(top_level=True)
    src = Path(__file__).resolve().parents[1] / "src"
    seen, todo = set(), ["uhrbat.options", "uhrbat.selectors", "uhrbat.progress"]
    while todo:
        mod = todo.pop()
        if mod in seen or mod == "uhrbat":  # the package itself registers the Auto classes
            continue
        seen.add(mod)
        path = src / (mod.replace(".", "/") + ".py")
        if not path.exists():
            path = src / mod.replace(".", "/") / "__init__.py"
        text = path.read_text()
        assert not re.search(r"^(import torch|from torch|import transformers|from transformers)", text, re.M), mod
        todo += [d for d in graph[mod] if d != mod]
    assert "uhrbat.options" in seen and "uhrbat.errors" in seen
