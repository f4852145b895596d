"""`run_batch`: list -> skip done ids -> engine -> `predictions.jsonl` (+ GeoJSON, Parquet, summary)."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uhrbat.batch.engines import run_local, run_ray
from uhrbat.batch.inputs import BatchRow, Trust
from uhrbat.batch.output import PARQUET, PREDICTIONS, SUMMARY, Answered, PredictionStore, Summary, write_parquet
from uhrbat.errors import BatchEngineError, ConfigError
from uhrbat.factory import model_identity
from uhrbat.rowrunner import hold_back_unexpected
from uhrbat.runfiles import RowProgress, atomic_write, refuse_directories

__all__ = ["BatchConfig", "run_batch"]

ENGINES = ("local", "ray")


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


@dataclass
class BatchConfig:
    """Everything `uhrbat batch` needs besides the rows.

    load: `uhrbat.factory.load_pipeline` load options (device, dtype, attn_implementation,
    vision_tower, compat, cache_dir); selection: budgets, selector, kmeans_*, seed; generate: extra
    generation kwargs; read_opts: `open_image` kwargs (bands, stretch, max_pixels);
    retry_errors: answer again the ids whose row is an error.
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
    retry_errors: bool = False
    log: Callable[[str], None] = _stderr
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
            "model": model_identity(self.model),
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


def _engine(cfg: BatchConfig, todo: Sequence[BatchRow], on_loaded: Callable[[], None]) -> Iterator[Answered]:
    model = {"model": cfg.model, "load": cfg.load, "selection": cfg.selection, "run": cfg.run_kwargs()}
    if cfg.engine == "local":
        return run_local(todo, **model, on_loaded=on_loaded, log=cfg.log)
    return run_ray(
        todo,
        **model,
        address=cfg.ray_address,
        actors=cfg.actors,
        gpus_per_actor=cfg.gpus_per_actor,
        cpus_per_actor=cfg.cpus_per_actor,
        local_cpus=cfg.ray_local_cpus,
    )


def run_batch(rows: Sequence[BatchRow], cfg: BatchConfig) -> Summary:
    """Answer every row not yet in `cfg.out/predictions.jsonl` (and, with `retry_errors`, every
    row whose answer is an error); returns the run's summary (`Summary.outputs`: the files written).

    Resumable: rows already written are skipped, each new row is appended as it finishes. Error
    rows are logged (`cfg.log`) as they are written; the abort rule is `uhrbat.rowrunner`'s."""
    if cfg.engine not in ENGINES:
        raise ConfigError(f"unknown --engine {cfg.engine!r}; choose local or ray")
    if cfg.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {cfg.batch_size}")
    t0 = time.perf_counter()
    out = Path(cfg.out).expanduser()
    summary = Summary(rows=len(rows), engine=cfg.engine)
    ids = [r.id for r in rows]
    refuse_directories(out / PREDICTIONS, out / SUMMARY, *([out / PARQUET] if cfg.parquet else []))
    with PredictionStore(out, cfg.fingerprint(), cfg.geojson_dir, log=cfg.log) as store:
        todo = store.pending(rows, cfg.retry_errors)
        summary.already_done = len(rows) - len(todo)
        if cfg.retry_errors:
            summary.extra["retried"] = len(store.retrying)
        with RowProgress(cfg.progress, f"batch ({cfg.engine})", len(todo)) as progress:
            stream = hold_back_unexpected(
                _engine(cfg, todo, progress.start_clock),
                unexpected=lambda a: a.unexpected,
                answered=lambda a: a.row.get("answer") is not None,
                log=cfg.log,
            )
            for answered in stream:
                if store.write(answered):
                    summary.written += 1
                    summary.scenes_prepared += int(answered.prepared)
                    if answered.row.get("error"):
                        cfg.log(f"{answered.row['id']}: {answered.row['error']}")
                progress.advance()
        missing = [i for i in ids if i not in store.done]
        if missing:  # an engine that silently lost rows must not look complete
            raise BatchEngineError(
                f"{len(missing)} rows have no answer in {store.path} (e.g. {missing[:3]}); "
                "rerun the same command to finish them"
            )
        store.compact()
        summary.errors = sum(1 for i in ids if i in store.error_ids)
        written = [store.path, *store.created]
        if cfg.parquet:
            written.append(write_parquet(out / PARQUET, store.read_rows(ids)))
        summary.wall_s = time.perf_counter() - t0
        written.append(atomic_write(out / SUMMARY, json.dumps(summary.to_dict(), indent=2) + "\n"))
        summary.outputs = [str(p) for p in written]
        if store.geojson_written:
            summary.outputs.append(
                f"{store.geojson_written} kept-token files (.geojson or .pixels.json) in {store.geojson_dir}"
            )
    return summary
