"""`run_batch`: list -> skip done ids -> engine -> `predictions.jsonl` (+ GeoJSON, Parquet, summary)."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uhrbat.batch.engines import run_local, run_ray
from uhrbat.batch.inputs import BatchRow, Trust
from uhrbat.batch.output import PARQUET, Answered, PredictionStore, Summary, write_parquet
from uhrbat.errors import BatchEngineError, ConfigError
from uhrbat.runfiles import progress_bar

__all__ = ["BatchConfig", "run_batch"]

ENGINES = ("local", "ray")


@dataclass
class BatchConfig:
    """Everything `uhrbat batch` needs besides the rows.

    load: `from_pretrained` kwargs (device, dtype, attn_implementation, vision_tower, compat, cache_dir);
    selection: budgets, selector, kmeans_*, seed; generate: extra generation kwargs;
    read_opts: `open_image` kwargs (bands, stretch, max_pixels).
    """

    out: str | os.PathLike
    model: str
    engine: str = "local"
    load: dict[str, Any] = field(default_factory=dict)
    selection: dict[str, Any] = field(default_factory=dict)
    generate: dict[str, Any] = field(default_factory=dict)
    max_new_tokens: int = 512
    read_opts: dict[str, Any] = field(default_factory=dict)
    trust: Trust = "local"
    batch_size: int = 1
    geojson_dir: str | os.PathLike | None = None
    parquet: bool = False
    progress: bool = True
    # Ray
    ray_address: str | None = None
    actors: int = 1
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0
    ray_local_cpus: int | None = None

    def fingerprint(self) -> dict[str, Any]:
        """Settings that decide the answers; a rerun into the same --out must match them."""
        load = {k: self.load.get(k) for k in ("dtype", "attn_implementation", "vision_tower", "compat")}
        read = {k: (list(v) if isinstance(v, tuple) else v) for k, v in sorted(self.read_opts.items())}
        return {
            "model": self.model,
            "selection": self.selection,
            "max_new_tokens": self.max_new_tokens,
            "generate": self.generate,
            "load": load,
            "read": read,
            "trust": self.trust,
        }

    def run_kwargs(self) -> dict[str, Any]:
        return {
            "max_new_tokens": self.max_new_tokens,
            "read_opts": dict(self.read_opts),
            "trust": self.trust,
            "geojson": self.geojson_dir is not None,
            "batch_size": self.batch_size,
            **self.generate,
        }


def _engine(cfg: BatchConfig, todo: Sequence[BatchRow]) -> Iterator[Answered]:
    if cfg.engine == "local":
        return run_local(todo, model=cfg.model, load=cfg.load, selection=cfg.selection, run=cfg.run_kwargs())
    return run_ray(
        todo,
        model=cfg.model,
        load=cfg.load,
        selection=cfg.selection,
        run=cfg.run_kwargs(),
        address=cfg.ray_address,
        actors=cfg.actors,
        gpus_per_actor=cfg.gpus_per_actor,
        cpus_per_actor=cfg.cpus_per_actor,
        local_cpus=cfg.ray_local_cpus,
    )


def run_batch(rows: Sequence[BatchRow], cfg: BatchConfig) -> Summary:
    """Answer every row not yet in `cfg.out/predictions.jsonl`; returns the run's summary.

    Resumable: rows already written are skipped, each new row is appended as it finishes."""
    if cfg.engine not in ENGINES:
        raise ConfigError(f"unknown --engine {cfg.engine!r}; choose local or ray")
    if cfg.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {cfg.batch_size}")
    t0 = time.perf_counter()
    summary = Summary(rows=len(rows), engine=cfg.engine)
    ids = [r.id for r in rows]
    with PredictionStore(cfg.out, cfg.fingerprint(), cfg.geojson_dir) as store:
        if store.n_torn:
            print(f"{store.path}: dropped {store.n_torn} torn line(s) left by an interrupted run", file=sys.stderr)
        done = store.done
        todo = [r for r in rows if r.id not in done]
        summary.already_done = len(rows) - len(todo)
        with progress_bar(cfg.progress) as progress:
            task = progress.add_task(f"batch ({cfg.engine})", total=len(todo))
            for answered in _engine(cfg, todo):
                if store.write(answered):
                    summary.written += 1
                    summary.scenes_prepared += int(answered.prepared)
                progress.advance(task)
        missing = [i for i in ids if i not in store.done]
        if missing:  # an engine that silently lost rows must not look complete
            raise BatchEngineError(
                f"{len(missing)} rows have no answer in {store.path} (e.g. {missing[:3]}); "
                "rerun the same command to finish them"
            )
        summary.errors = sum(1 for i in ids if i in store.error_ids)
        if cfg.parquet:
            write_parquet(Path(cfg.out) / PARQUET, store.read_rows(ids))
        summary.wall_s = time.perf_counter() - t0
        (Path(cfg.out) / "summary.json").write_text(json.dumps(summary.to_dict(), indent=2) + "\n", encoding="utf-8")
    return summary
