"""Registry of supported benchmarks: scorer module, generation defaults, provenance."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Mapping

from uhrbat.evaluation.loaders import BENCHMARK_NAMES, check_benchmark
from uhrbat.evaluation.records import Sample
from uhrbat.evaluation.report import Report

__all__ = ["BenchmarkSpec", "BENCHMARK_NAMES", "get_spec", "scorer", "score"]


@dataclass(frozen=True)
class BenchmarkSpec:
    name: str
    module: str
    max_new_tokens: int
    max_new_tokens_source: str
    multiple_choice: bool


SPECS: dict[str, BenchmarkSpec] = {
    "xlrs": BenchmarkSpec("xlrs", "xlrs", 64, "lmms-eval tasks/xlrs/XLRS-lite.yaml", True),
    "mme-realworld-rs": BenchmarkSpec("mme-realworld-rs", "mme_realworld", 64,
                                      "MME-RealWorld evaluation/model_vqa_mme_real_world.py --max_new_tokens default", True),
    "rshr": BenchmarkSpec("rshr", "rshr", 512, "UHR-BAT reference eval_xlrs_multiscale_to_json.py --max_new_tokens default", True),
    "hrbench-4k": BenchmarkSpec("hrbench-4k", "hrbench", 128, "not set by lmms-eval tasks/hrbench; our choice", True),
    "hrbench-8k": BenchmarkSpec("hrbench-8k", "hrbench", 128, "not set by lmms-eval tasks/hrbench; our choice", True),
    "lrs-vqa": BenchmarkSpec("lrs-vqa", "lrs_vqa", 128, "LRS-VQA Script/llava_eval_LRSVQA.py --max_new_tokens default", False),
}


def get_spec(name: str) -> BenchmarkSpec:
    return SPECS[check_benchmark(name)]


def scorer(name: str) -> ModuleType:
    return importlib.import_module(f"uhrbat.evaluation.{get_spec(name).module}")


def score(name: str, samples: list[Sample], predictions: Mapping[str, Any]) -> Report:
    spec = get_spec(name)
    mod = scorer(name)
    if mod.__name__.endswith("hrbench"):
        return mod.score(samples, predictions, benchmark=spec.name)
    return mod.score(samples, predictions)
