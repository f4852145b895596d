"""Benchmark evaluation: official data formats in, official scoring rules out.

* `benchmarks` — the registry: one module per benchmark (rows, prompts, scoring rule, spec);
  `benchmarks.load_benchmark(name, data, images)` -> validated `Sample`s (bad rows become error
  samples), `benchmarks.score(name, samples, predictions)` -> `Report`
* below the registry, taking a `BenchmarkSpec` (never a name, so nothing imports back up):
  `records` (Sample, ImageRef, row errors), `spec`, `loaders.load_samples(spec, ...)`,
  `prompts.build_prompt(spec, sample, style)`, `scoring`, `report`
* `runner.run_eval(config)` -> the resumable, shardable `uhrbat eval` loop on the one row runner
  (`uhrbat.rowrunner`)
"""

from __future__ import annotations

from typing import Any

__all__ = ["BENCHMARK_NAMES"]


def __getattr__(name: str) -> Any:
    if name == "BENCHMARK_NAMES":  # computed from the registry on first use
        from uhrbat.evaluation.benchmarks import names

        return names()
    raise AttributeError(name)
