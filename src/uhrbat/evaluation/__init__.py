"""Benchmark evaluation: official data formats in, official scoring rules out.

* `benchmarks` — the registry: one module per benchmark (rows, prompts, scoring rule, spec)
* `loaders.load_benchmark(name, data, images)` -> validated `Sample`s (bad rows become error samples)
* `prompts.build_prompt(name, sample, style)` -> the official (or reference) question text
* `benchmarks.score(name, samples, predictions)` -> `Report`
* `runner.run_eval(config)` -> the resumable, shardable `uhrbat eval` loop
"""

from __future__ import annotations

from typing import Any

__all__ = ["BENCHMARK_NAMES"]


def __getattr__(name: str) -> Any:
    if name == "BENCHMARK_NAMES":  # computed from the registry on first use
        from uhrbat.evaluation.benchmarks import names

        return names()
    raise AttributeError(name)
