"""Run the model over many batch rows: `answer_rows` (batch's face of the one row runner,
`uhrbat.rowrunner`) and the two engines.

* `answer_rows(pipe, rows, ...)` — `BatchRow`s -> `Answered` rows through `RowRunner` with
  `whole_scenes=True`: rows are grouped by image (first-appearance order), each scene is opened
  once (`open_row`: the shared reader, or the untrusted one) and its questions go to the model in
  one call (the scene cache prepares it once); one-question scenes are answered `batch_size` at a
  time. Used by the local engine and by every Ray actor.
* `run_local(...)` — in-process: load the pipeline (`uhrbat.factory`), yield answered rows.
* `run_ray(...)` — Ray Data: one dataset row per scene (so all rows of a scene reach the same
  actor), `map_batches` with an actor class that holds the model (`num_gpus` per actor, a pool
  of `actors`), answered rows streamed back to the driver, which writes them.

Failure policy: the row runner's (per-row isolation; an image that is missing, corrupt, oversized
or refused, a model error, a GeoJSON that cannot be built: that row's error). The abort rule
(`uhrbat.rowrunner.hold_back_unexpected`) is applied by the writer (`run_batch`), on the driver.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from uhrbat.batch.inputs import BatchRow, Trust
from uhrbat.batch.output import Answered, output_row
from uhrbat.errors import BatchEngineError, ConfigError, UhrBatError
from uhrbat.factory import load_pipeline
from uhrbat.rowrunner import Job, Outcome, RowRunner, error_message, group_by_scene

__all__ = ["answer_rows", "open_row", "run_local", "run_ray"]

MAX_RAY_BLOCKS = 4096


def open_row(row: BatchRow, read_opts: dict[str, Any], trust: Trust) -> Any:
    """The opened image of a row: `uhrbat.io.open_image` with the reading options (a row's own
    region replaces the command's), remembering its file (`uhrbat.scene.origin.open_source`: zoom
    reads windows of it); `trust="untrusted"` decodes with the untrusted reader, inside
    `decode_section` (bounded concurrent decodes, as the server does)."""
    from uhrbat.options import REGION_FIELDS
    from uhrbat.scene.origin import open_source

    opts = {k: v for k, v in read_opts.items() if v is not None or k == "max_pixels"}
    if row.region is not None:
        opts = {k: v for k, v in opts.items() if k not in REGION_FIELDS} | row.region_kwargs()
    if trust == "untrusted":
        from uhrbat.io.decoding import decode_section

        with decode_section():
            return open_source(row.path, trust="untrusted", **opts)
    return open_source(row.path, **opts)


def _row_step(out: Outcome, source: Any) -> None:
    out.extra["row"] = output_row(out.job.item, result=out.result, seconds=out.seconds)


def _geojson_step(out: Outcome, source: Any) -> None:
    from uhrbat.io.geo import kept_tokens_document

    row: BatchRow = out.job.item
    # GeoJSON when the image is georeferenced, else the pixel-space file (never pixels as lon/lat);
    # in the full image's coordinates (a zoom answer's tokens belong to its window)
    window = out.result.window_source
    out.extra["geojson"], _ = kept_tokens_document(
        out.result.tokens,
        window if window is not None else source,
        properties={"id": row.id, "image": row.image, "question": row.question, "answer": out.result.answer},
    )


def answered(out: Outcome) -> Answered:
    """The `predictions.jsonl` row (and GeoJSON) of an outcome. A row whose GeoJSON failed keeps its
    answer and carries the error; it has no GeoJSON file."""
    row = out.extra.get("row") or output_row(out.job.item, seconds=out.seconds)
    if out.error:
        row = {**row, "error": out.error}
    # "miss": prepared and cached; "off" (no cache): prepared once per call, for its first row.
    cache = getattr(out.result, "cache", "off") if out.answered else None
    prepared = out.answered and (cache == "miss" or (cache == "off" and out.first))
    return Answered(
        row, None if out.error else out.extra.get("geojson"), prepared=bool(prepared), unexpected=out.unexpected
    )


def answer_rows(
    pipe: Any,
    rows: Iterable[BatchRow],
    *,
    max_new_tokens: int = 512,
    read_opts: dict[str, Any] | None = None,
    trust: Trust = "local",
    geojson: bool = False,
    batch_size: int = 1,
    load: Callable[[], Any] | None = None,
    on_loaded: Callable[[], None] | None = None,
    log: Callable[[str], None] | None = None,
    **ask_kwargs: Any,
) -> Iterator[Answered]:
    """Answer `rows` with `pipe`, yielding one `Answered` per row (errors included), scene by scene.

    pipe: a `UhrBatPipeline` (anything with `ask`, `ask_batch` returning `AskResult`s), or None
    with `load` (called at the first model call; `on_loaded` after it).
    rows: `BatchRow`s; rows with `error` set come back as error rows untouched.
    read_opts: `uhrbat.io.open_image` options (bands, stretch, max_pixels).
    trust: "untrusted" reads every image with the untrusted reader.
    geojson: attach each row's kept-token GeoJSON (map coordinates when georeferenced).
    batch_size: one-question scenes answered this many at a time (`ask_batch`).
    ask_kwargs: selection (budgets, selector, kmeans_clusters, ...) and generation options.
    Each `Answered.row` is the `predictions.jsonl` row: id, image, question, answer, error,
    num_visual_tokens, image_size, cache, timings (per stage, seconds), seconds (this row's share).
    Apply `uhrbat.rowrunner.hold_back_unexpected` to the stream for the abort rule.
    """
    opts = dict(read_opts or {})
    steps: list[tuple[str | None, Callable[[Outcome, Any], None]]] = [(None, _row_step)]
    if geojson:
        steps.append(("GeoJSON", _geojson_step))
    runner = RowRunner(
        pipe,
        open_scene=lambda job: open_row(job.item, opts, trust),
        max_new_tokens=max_new_tokens,
        ask_kwargs=ask_kwargs,
        batch_size=max(1, int(batch_size)),
        whole_scenes=True,
        finish=steps,
        load=load,
        on_loaded=on_loaded,
        log=log,
    )
    jobs = (Job(id=r.id, question=r.question, scene=r.scene, error=r.error, item=r) for r in rows)
    for out in runner.run(jobs):
        yield answered(out)


def run_local(
    rows: Sequence[BatchRow],
    *,
    model: str,
    load: dict[str, Any],
    selection: dict[str, Any],
    run: dict[str, Any],
    pipe: Any = None,
    on_loaded: Callable[[], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> Iterator[Answered]:
    """In-process engine. `run` holds `answer_rows` keyword arguments (max_new_tokens, read_opts,
    trust, geojson, batch_size, generation kwargs). The model is loaded only if a row needs it."""
    yield from answer_rows(
        pipe,
        rows,
        load=lambda: load_pipeline(model, **load, **selection),
        on_loaded=on_loaded,
        log=log,
        **run,
    )


# ---------------------------------------------------------------------------------------- Ray
class _SceneActor:
    """Ray Data actor: holds one pipeline; each input row is one scene (its rows as JSON)."""

    def __init__(
        self, model: str, load: dict[str, Any], selection: dict[str, Any], run: dict[str, Any], threads: int | None
    ) -> None:
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.pipe = load_pipeline(model, **load, **selection)  # device "auto": this actor's GPU if it has one
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
        raise BatchEngineError(f"could not start or join {where}: {error_message(e)}") from None
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
    scenes = [
        [j.item for j in g]
        for g in group_by_scene(Job(r.id, r.question, r.scene, item=r) for r in rows if r.error is None)
    ]
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
            f"the Ray job failed: {error_message(e)}; rows written so far are kept, rerun to resume"
        ) from None
    finally:
        if owned:
            ray.shutdown()
