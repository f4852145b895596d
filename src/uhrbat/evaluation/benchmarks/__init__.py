"""The benchmark registry: one module per benchmark in this package, discovered at first use.

Each module here defines `SPECS` (a tuple of `uhrbat.evaluation.spec.BenchmarkSpec`) beside
its row normaliser, prompts and official scoring rule, so adding a benchmark is one new module
here plus its tests (README "Add a benchmark"). Nothing else lists benchmarks by name; the
modules below this registry (`loaders`, `prompts`, `scoring`, `spec`, `records`) take a spec,
never a name, so no import circle runs through here.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import threading
from collections.abc import Mapping
from types import ModuleType
from typing import Any

from uhrbat.errors import BenchmarkDataError, ConfigError
from uhrbat.evaluation.loaders import load_samples
from uhrbat.evaluation.records import Sample
from uhrbat.evaluation.report import Report
from uhrbat.evaluation.spec import BenchmarkSpec

__all__ = [
    "BenchmarkSpec",
    "check_score_options",
    "get_spec",
    "load_benchmark",
    "names",
    "register",
    "score",
    "scorer",
]

_REGISTRY: dict[str, BenchmarkSpec] = {}
_ALIASES: dict[str, str] = {}
_LOCK = threading.Lock()
_DISCOVERED = False


def register(spec: BenchmarkSpec) -> BenchmarkSpec:
    """Add a benchmark (the built-in modules are registered automatically; plugins may call this)."""
    key = spec.name.lower()
    if key in _REGISTRY and _REGISTRY[key] is not spec:
        raise ConfigError(f"benchmark {spec.name!r} is registered twice")
    _REGISTRY[key] = spec
    for a in spec.aliases:
        _ALIASES[a.lower()] = key
    return spec


def _discover() -> None:
    global _DISCOVERED
    if _DISCOVERED:
        return
    with _LOCK:
        if _DISCOVERED:
            return
        for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
            mod = importlib.import_module(f"{__name__}.{info.name}")
            for spec in getattr(mod, "SPECS", ()):
                register(spec)
        _DISCOVERED = True


def names() -> tuple[str, ...]:
    """Canonical benchmark names, in registration order."""
    _discover()
    return tuple(_REGISTRY)


def get_spec(name: str) -> BenchmarkSpec:
    """The spec for a benchmark name or alias; BenchmarkDataError naming the choices otherwise."""
    _discover()
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in _REGISTRY:
        raise BenchmarkDataError(f"unknown benchmark {name!r}; choose one of {', '.join(_REGISTRY)}")
    return _REGISTRY[key]


def scorer(name: str) -> ModuleType:
    """The module holding the benchmark's `extract` / `correct` / `aggregate`."""
    return get_spec(name).scorer


def _options(spec: BenchmarkSpec, options: Mapping[str, Any]) -> dict[str, Any]:
    given = {k: v for k, v in options.items() if v is not None}
    for k in given:
        if k not in spec.score_options:
            flag = "--" + k.replace("_", "-")
            raise ConfigError(f"{flag} does not apply to {spec.name}; drop it")
    return given


def check_score_options(name: str, **options: Any) -> None:
    """Validate scoring options up front (before any model runs); None values mean "default"."""
    spec = get_spec(name)
    given = _options(spec, options)
    if spec.check_options is not None:
        spec.check_options(**given)


def score(name: str, samples: list[Sample], predictions: Mapping[str, Any], **options: Any) -> Report:
    """Score predictions ({id: output | Prediction | row}) with the benchmark's official rule."""
    spec = get_spec(name)
    return spec.score(samples, predictions, **_options(spec, options))


def load_benchmark(
    name: str,
    data: str | os.PathLike,
    images: str | os.PathLike | None = None,
    check_images: bool = True,
    allow_outside_images: bool = False,
) -> list[Sample]:
    """The validated samples of benchmark `name` (or alias); see `loaders.load_samples`."""
    return load_samples(get_spec(name), data, images, check_images, allow_outside_images)
