"""The benchmark registry (issue 13): one module per benchmark, found without a list, and the
README "Add a benchmark" example working as written."""

from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path

import pytest

from test_eval_support import write_png
from uhrbat.errors import BenchmarkDataError
from uhrbat.evaluation import BENCHMARK_NAMES, benchmarks, prompts
from uhrbat.evaluation.benchmarks import get_spec, load_benchmark

README = Path(__file__).resolve().parents[1] / "README.md"


def test_every_benchmark_lives_in_one_module():
    assert set(BENCHMARK_NAMES) == {"xlrs", "mme-realworld-rs", "rshr", "hrbench-4k", "hrbench-8k", "lrs-vqa"}
    for name in BENCHMARK_NAMES:
        spec = benchmarks.get_spec(name)
        mod = spec.scorer
        assert mod.__name__.startswith("uhrbat.evaluation.benchmarks.")
        # rows, prompts and scoring rule all come from that one module
        assert spec.normalise.__module__ == mod.__name__
        assert {fn.__module__ for fn, _ in spec.prompts.values()} <= {mod.__name__, prompts.__name__}
        assert spec in mod.SPECS and callable(mod.extract) and callable(mod.correct) and callable(mod.aggregate)


@pytest.mark.parametrize(
    "alias,name",
    [
        ("XLRS-Lite", "xlrs"),
        ("mme-rs", "mme-realworld-rs"),
        ("xhrbench", "rshr"),
        ("hrbench8k", "hrbench-8k"),
        ("lrsvqa", "lrs-vqa"),
    ],
)
def test_aliases(alias, name):
    assert benchmarks.get_spec(alias).name == name


def test_unknown_benchmark_lists_the_choices():
    with pytest.raises(BenchmarkDataError, match="unknown benchmark 'nope'; choose one of .*xlrs"):
        benchmarks.get_spec("nope")


def test_readme_add_a_benchmark_example_works(tmp_path):
    text = README.read_text(encoding="utf-8")
    section = text[text.index("### Add a benchmark") :]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    mod = types.ModuleType("my_bench_from_readme")
    sys.modules[mod.__name__] = mod
    try:
        exec(compile(code, "README-example", "exec"), mod.__dict__)
        (spec,) = mod.SPECS
        benchmarks.register(spec)
        d = tmp_path / "mb"
        write_png(d / "a.png")
        rows = [
            {"id": 1, "image": "a.png", "question": "Which?", "options": ["x", "y"], "answer": "B"},
            {"id": 2, "image": "a.png", "question": "Which?", "options": ["x", "y"], "answer": "A"},
        ]
        (d / "data.json").write_text(json.dumps(rows))
        samples = load_benchmark("my-bench", d / "data.json")
        assert [s.id for s in samples] == ["1", "2"] and all(s.ok for s in samples)
        assert prompts.build_prompt(get_spec("my-bench"), samples[0]) == "Which?\nx\ny"  # option lines as distributed
        rep = benchmarks.score("my-bench", samples, {"1": "b", "2": "B"})
        assert rep.per_sample == {"1": True, "2": False} and rep.headline["accuracy"] == 50.0
    finally:
        benchmarks._REGISTRY.pop("my-bench", None)
        sys.modules.pop(mod.__name__, None)


def test_modules_below_the_registry_never_import_it():
    """Issue 19: no `benchmarks <-> loaders <-> spec` circle, not even through imports deferred into
    functions or the registry's discovery (benchmark modules import the modules below it)."""
    from test_structure import import_graph

    graph = import_graph(top_level=False)
    below = [
        "uhrbat.evaluation.records",
        "uhrbat.evaluation.spec",
        "uhrbat.evaluation.loaders",
        "uhrbat.evaluation.prompts",
        "uhrbat.evaluation.scoring",
        "uhrbat.evaluation.report",
    ]
    seen, todo = set(), list(below)
    while todo:  # everything the lower modules reach, transitively
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += graph.get(m, ())
    assert "uhrbat.evaluation.benchmarks" not in seen
    assert not any(m.startswith("uhrbat.evaluation.benchmarks.") for m in seen)
    assert "uhrbat.evaluation.runner" not in seen
