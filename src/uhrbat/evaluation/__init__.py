"""Benchmark evaluation: official data formats in, official scoring rules out.

* `loaders.load_benchmark(name, data, images)` -> validated `Sample`s (bad rows become error samples)
* `prompts.build_prompt(name, sample, style)` -> the official (or reference) question text
* `benchmarks.score(name, samples, predictions)` -> `Report` (one scorer module per benchmark)
* `runner.run_eval(config)` -> the resumable, shardable `uhrbat eval` loop
"""

from uhrbat.evaluation.loaders import BENCHMARK_NAMES

__all__ = ["BENCHMARK_NAMES"]
