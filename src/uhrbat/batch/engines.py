"""Run the model over many rows: the row runner (`answer_rows`) and the two engines.

* `answer_rows(pipe, rows, ...)` — the one code path for "run the model over many rows", used by
  the local engine, by every Ray actor and reusable by `uhrbat eval`. Rows are grouped by image
  (first-appearance order) so each scene is opened once and its questions go to
  `pipe.ask_many` (the scene cache prepares the scene once); one-question scenes are answered
  `batch_size` at a time with `pipe.ask_batch`.
* `run_local(...)` — in-process: load the pipeline, yield answered rows.
* `run_ray(...)` — Ray Data: one dataset row per scene (so all rows of a scene reach the same
  actor), `map_batches` with an actor class that holds the model (`num_gpus` per actor, a pool
  of `actors`), answered rows streamed back to the driver, which writes them.

Failure policy (per row, never a silent drop): an image that is missing, corrupt, oversized or
refused becomes an error row for each of its questions; a model error on one question becomes
that row's error. An unexpected (non-`UhrBatError`) exception before the model has answered
anything aborts the run instead, unwritten, so a broken install or checkpoint is not recorded
as thousands of error rows and the rerun retries them.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uhrbat.batch.inputs import BatchRow, Trust
from uhrbat.batch.output import Answered, output_row
from uhrbat.errors import BatchEngineError, ConfigError, UhrBatError

__all__ = ["RowRunner", "answer_rows", "group_by_image", "load_pipeline", "run_local", "run_ray"]

MAX_RAY_BLOCKS = 4096


def group_by_image(rows: Iterable[BatchRow]) -> list[list[BatchRow]]:
    """Rows grouped by resolved image path, in order of first appearance (error rows: one group each)."""
    groups: dict[Any, list[BatchRow]] = {}
    for i, r in enumerate(rows):
        key = r.path if r.error is None else ("error", i)
        groups.setdefault(key, []).append(r)
    return list(groups.values())


def _message(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


@dataclass
class RowRunner:
    """Answers `BatchRow`s with a pipeline (see `answer_rows`, which wraps it).

    read_opts: `open_image` keyword arguments (bands, stretch, max_pixels); trust: "untrusted"
    decodes with the untrusted reader (lists we do not control); geojson: also build each row's
    kept-token FeatureCollection; ask_kwargs: selection and generation options for the pipeline.
    """

    pipe: Any
    max_new_tokens: int = 512
    read_opts: dict[str, Any] = field(default_factory=dict)
    trust: Trust = "local"
    geojson: bool = False
    batch_size: int = 1
    ask_kwargs: dict[str, Any] = field(default_factory=dict)
    successes: int = 0

    def open(self, row: BatchRow) -> Any:
        from uhrbat.io import open_image

        opts = {k: v for k, v in self.read_opts.items() if v is not None or k == "max_pixels"}
        if self.trust == "untrusted":
            from uhrbat.io.decoding import decode_section

            with decode_section():  # bounds concurrent untrusted decodes (memory), as the server does
                return open_image(row.path, trust="untrusted", **opts)
        return open_image(row.path, **opts)

    def _answered(self, row: BatchRow, source: Any, res: Any, seconds: float, first: bool = True) -> Answered:
        gj = None
        if self.geojson:
            from uhrbat.io.geo import kept_tokens_document

            gj, _ = kept_tokens_document(  # GeoJSON when georeferenced, else the pixel-space file
                res.tokens,
                source,
                properties={"id": row.id, "image": row.image, "question": row.question, "answer": res.answer},
            )
        # "miss": prepared and cached; "off" (no cache): prepared once per call, for its first row.
        cache = getattr(res, "cache", "off")
        prepared = cache == "miss" or (cache == "off" and first)
        return Answered(output_row(row, result=res, seconds=seconds), gj, prepared=prepared)

    def _failed(self, row: BatchRow, e: BaseException) -> Answered:
        if self.successes == 0 and not isinstance(e, UhrBatError):
            raise e  # nothing has worked yet: a broken setup, not a bad row
        return Answered(output_row(row, error=_message(e)))

    def _one_by_one(self, rows: Sequence[BatchRow], source: Any) -> Iterator[Answered]:
        for row in rows:
            t = time.perf_counter()
            try:
                res = self.pipe.ask(source, row.question, max_new_tokens=self.max_new_tokens, **self.ask_kwargs)
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as e:  # noqa: BLE001 - per-row isolation
                yield self._failed(row, e)
                continue
            self.successes += 1
            yield self._answered(row, source, res, time.perf_counter() - t)

    def _scene(self, rows: Sequence[BatchRow], source: Any) -> Iterator[Answered]:
        """All questions about one opened scene: `ask_many`; on failure, isolate the bad question."""
        t = time.perf_counter()
        try:
            results = self.pipe.ask_many(
                source, [r.question for r in rows], max_new_tokens=self.max_new_tokens, **self.ask_kwargs
            )
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception:  # noqa: BLE001 - per-row isolation
            yield from self._one_by_one(rows, source)
            return
        share = (time.perf_counter() - t) / len(rows)
        self.successes += 1
        for i, (row, res) in enumerate(zip(rows, results, strict=True)):
            yield self._answered(row, source, res, share, first=i == 0)

    def _singles(self, items: Sequence[tuple[BatchRow, Any]]) -> Iterator[Answered]:
        """One question per scene, several scenes: one `ask_batch` call (left-padded generation)."""
        if len(items) == 1:
            yield from self._one_by_one([items[0][0]], items[0][1])
            return
        t = time.perf_counter()
        try:
            results = self.pipe.ask_batch(
                [s for _, s in items],
                [r.question for r, _ in items],
                max_new_tokens=self.max_new_tokens,
                **self.ask_kwargs,
            )
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception:  # noqa: BLE001 - per-row isolation
            for row, source in items:
                yield from self._one_by_one([row], source)
            return
        share = (time.perf_counter() - t) / len(items)
        self.successes += 1
        for (row, source), res in zip(items, results, strict=True):
            yield self._answered(row, source, res, share)

    def run(self, rows: Iterable[BatchRow]) -> Iterator[Answered]:
        pending: list[tuple[BatchRow, Any]] = []
        for group in group_by_image(rows):
            first = group[0]
            if first.error is not None:
                yield Answered(output_row(first, error=first.error))
                continue
            try:
                source = self.open(first)
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as e:  # noqa: BLE001 - missing / corrupt / oversized / refused: an error row per question
                msg = _message(e)
                for row in group:
                    yield Answered(output_row(row, error=msg))
                continue
            if len(group) == 1 and self.batch_size > 1:
                pending.append((first, source))
                if len(pending) >= self.batch_size:
                    yield from self._singles(pending)
                    pending = []
                continue
            if len(group) == 1:
                yield from self._one_by_one(group, source)
            else:
                yield from self._scene(group, source)
        if pending:
            yield from self._singles(pending)


def answer_rows(
    pipe: Any,
    rows: Iterable[BatchRow],
    *,
    max_new_tokens: int = 512,
    read_opts: dict[str, Any] | None = None,
    trust: Trust = "local",
    geojson: bool = False,
    batch_size: int = 1,
    **ask_kwargs: Any,
) -> Iterator[Answered]:
    """Answer `rows` with `pipe`, yielding one `Answered` per row (errors included), scene by scene.

    pipe: a `UhrBatPipeline` (anything with `ask`, `ask_many`, `ask_batch` returning `AskResult`s).
    rows: `BatchRow`s; rows with `error` set come back as error rows untouched.
    read_opts: `uhrbat.io.open_image` options (bands, stretch, max_pixels).
    trust: "untrusted" reads every image with the untrusted reader.
    geojson: attach each row's kept-token GeoJSON (map coordinates when georeferenced).
    batch_size: one-question scenes answered this many at a time (`ask_batch`).
    ask_kwargs: selection (budgets, selector, kmeans_clusters, ...) and generation options.
    Each `Answered.row` is the `predictions.jsonl` row: id, image, question, answer, error,
    num_visual_tokens, image_size, cache, timings (per stage, seconds), seconds (this row's share).
    """
    runner = RowRunner(
        pipe,
        max_new_tokens=max_new_tokens,
        read_opts=dict(read_opts or {}),
        trust=trust,
        geojson=geojson,
        batch_size=max(1, int(batch_size)),
        ask_kwargs=ask_kwargs,
    )
    return runner.run(rows)


def load_pipeline(model: str, *, load: dict[str, Any], selection: dict[str, Any], scene_cache: Any = True) -> Any:
    """`UhrBatPipeline.from_pretrained` with the CLI's load and selection keyword arguments."""
    from uhrbat.pipeline import UhrBatPipeline

    kw = {k: v for k, v in load.items() if v is not None}
    return UhrBatPipeline.from_pretrained(model, scene_cache=scene_cache, **kw, **selection)


def run_local(
    rows: Sequence[BatchRow],
    *,
    model: str,
    load: dict[str, Any],
    selection: dict[str, Any],
    run: dict[str, Any],
    pipe: Any = None,
    on_loaded: Callable[[], None] | None = None,
) -> Iterator[Answered]:
    """In-process engine. `run` holds `answer_rows` keyword arguments (max_new_tokens, read_opts,
    trust, geojson, batch_size, generation kwargs). The model is loaded only if a row needs it."""
    runnable = [r for r in rows if r.error is None]
    if not runnable:
        yield from answer_rows(None, rows, **run)
        return
    if pipe is None:
        pipe = load_pipeline(model, load=load, selection=selection)
    if on_loaded is not None:
        on_loaded()
    yield from answer_rows(pipe, rows, **run)


# ---------------------------------------------------------------------------------------- Ray
class _SceneActor:
    """Ray Data actor: holds one pipeline; each input row is one scene (its rows as JSON)."""

    def __init__(
        self, model: str, load: dict[str, Any], selection: dict[str, Any], run: dict[str, Any], threads: int | None
    ) -> None:
        import torch

        if threads:
            torch.set_num_threads(threads)
        load = dict(load)
        if load.get("device", "cpu") == "auto":
            load["device"] = "cuda" if torch.cuda.is_available() else "cpu"
        self.pipe = load_pipeline(model, load=load, selection=selection)
        self.run = run

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[str]]:
        rows = [BatchRow.from_dict(d) for scene in batch["scene"] for d in json.loads(str(scene))]
        return {"answered": [a.to_json() for a in answer_rows(self.pipe, rows, **self.run)]}


def _ray_init(address: str | None, local_cpus: int | None) -> bool:
    """Join `address` / RAY_ADDRESS, or start a local Ray. Returns whether we started (and own) it."""
    try:
        import ray
    except ImportError:
        raise ConfigError("--engine ray needs Ray: pip install -e '.[ray]'") from None
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    try:
        if address:
            ray.init(address=address, **kw)
        else:
            ray.init(num_cpus=local_cpus, **kw)
    except Exception as e:  # noqa: BLE001 - any Ray start-up failure: one line
        where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        raise BatchEngineError(f"could not start or join {where}: {_message(e)}") from None
    return True


def _absolute_paths(model: str, load: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Local paths the actors get, made absolute (Ray workers run in another folder); a model
    path that does not exist fails here, on the driver, with one line (not inside every actor)."""
    from uhrbat.modeling.hub import local_dir

    load = dict(load)
    if Path(model).exists() or str(model).startswith((".", "/", "~")) or str(model).count("/") > 1:
        model = str(local_dir(model).absolute())  # CheckpointError for a missing folder or a file
    if load.get("vision_tower") and Path(load["vision_tower"]).exists():
        load["vision_tower"] = str(Path(load["vision_tower"]).absolute())
    if load.get("cache_dir"):
        load["cache_dir"] = str(Path(load["cache_dir"]).expanduser().absolute())
    return model, load


def run_ray(
    rows: Sequence[BatchRow],
    *,
    model: str,
    load: dict[str, Any],
    selection: dict[str, Any],
    run: dict[str, Any],
    address: str | None = None,
    actors: int = 1,
    gpus_per_actor: float = 0.0,
    cpus_per_actor: float = 1.0,
    local_cpus: int | None = None,
) -> Iterator[Answered]:
    """Ray Data engine: same rows and answers as `run_local`, computed by a pool of `actors`
    model-holding actors; rows come back as each scene finishes. Error rows known up front
    (bad list rows) are yielded without going through Ray."""
    for r in rows:
        if r.error is not None:
            yield Answered(output_row(r, error=r.error))
    scenes = [g for g in group_by_image(r for r in rows if r.error is None)]
    if not scenes:
        return
    if actors < 1:
        raise ConfigError(f"--actors must be >= 1, got {actors}")
    model, load = _absolute_paths(model, load)
    owned = _ray_init(address, local_cpus)
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False  # the driver draws its own bar
    ctx.print_on_execution_start = False
    load = dict(load)
    if gpus_per_actor > 0 and str(load.get("device", "cpu")).startswith("cpu"):
        load["device"] = "cuda"  # Ray gives each actor its own CUDA_VISIBLE_DEVICES
    items = [{"scene": json.dumps([r.to_dict() for r in g])} for g in scenes]
    # A block is what an actor finishes before its rows stream back (and what a kill can lose):
    # one scene per block, up to MAX_RAY_BLOCKS blocks (bigger lists: a few scenes per block).
    ds = ray.data.from_items(items, override_num_blocks=min(len(items), MAX_RAY_BLOCKS))
    ds = ds.map_batches(
        _SceneActor,
        batch_size=1,
        batch_format="numpy",
        compute=ActorPoolStrategy(size=actors),
        num_gpus=gpus_per_actor or None,
        num_cpus=cpus_per_actor,
        fn_constructor_kwargs={
            "model": model,
            "load": load,
            "selection": selection,
            "run": run,
            "threads": None if gpus_per_actor > 0 else max(1, int(cpus_per_actor)),
        },
    )
    try:
        for out in ds.iter_rows():
            yield Answered.from_json(str(out["answered"]))
    except UhrBatError:
        raise
    except Exception as e:  # noqa: BLE001 - a Ray task/actor failure: one line, resumable
        raise BatchEngineError(
            f"the Ray job failed: {_message(e)}; rows written so far are kept, rerun to resume"
        ) from None
    finally:
        if owned:
            ray.shutdown()
