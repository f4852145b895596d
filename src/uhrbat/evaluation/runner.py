"""The `uhrbat eval` loop: resumable, batched, sharded across ranks, merged at the end.

Files in the run directory:

* `run.json` — the settings that define the run; a rerun with different ones is refused.
* `predictions.rank{r}-of-{w}.jsonl` — one row per sample, appended and flushed as produced
  (a single `write` per row). A rerun reads every rank file, drops a torn last line of its
  own file, and skips the ids already there, so a run killed with SIGKILL and restarted ends
  with exactly one row per sample.
* `.rank{r}-of-{w}.done` — written when a rank has finished its shard.
* `predictions.jsonl`, `report.json`, `report.md` — written by rank 0 once every rank file is
  complete (merged by id, in benchmark order).

Sharding: ranks come from `RANK` / `WORLD_SIZE` (set by `torchrun` and `accelerate launch`);
sample i goes to rank `i % WORLD_SIZE`, so shards are deterministic. Each rank runs the same
command; no process group is needed.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from uhrbat.errors import BenchmarkDataError, ConfigError, UhrBatError
from uhrbat.evaluation import benchmarks, prompts
from uhrbat.evaluation.loaders import load_benchmark
from uhrbat.evaluation.records import ImageRef, Prediction, Sample, open_images
from uhrbat.evaluation.report import Report, atomic_write_text, write_report

__all__ = ["EvalConfig", "EvalIncomplete", "run_eval", "dist_info", "read_jsonl_rows", "load_predictions",
           "shard_of", "PIPELINE_HOOK_ENV"]

PIPELINE_HOOK_ENV = "UHRBAT_EVAL_PIPELINE"  # "module:attr" -> a class with from_pretrained (tests, plugins)
MERGE_TIMEOUT_ENV = "UHRBAT_EVAL_MERGE_TIMEOUT"
PREDICTIONS = "predictions.jsonl"


class EvalIncomplete(UhrBatError):
    """Rank 0 could not merge because another rank has not finished."""


@dataclass
class EvalConfig:
    benchmark: str
    data: str | os.PathLike
    out: str | os.PathLike
    model: str
    images: str | os.PathLike | None = None
    limit: int | None = None
    batch_size: int = 1
    prompt: str = "official"
    choice_by_logits: bool = False
    budgets: list[int] | None = None
    selector: str | None = None
    clusters: int | None = None
    iters: int | None = None
    seed: int | None = None
    device: str | None = None
    dtype: str | None = None
    max_new_tokens: int | None = None
    retry_errors: bool = False
    progress: bool = True
    generate_kwargs: dict[str, Any] = field(default_factory=dict)

    def selection(self) -> dict[str, Any]:
        sel = {"budgets": self.budgets, "selector": self.selector, "kmeans_clusters": self.clusters,
               "kmeans_iters": self.iters, "seed": self.seed}
        return {k: v for k, v in sel.items() if v is not None}


def dist_info(env: dict[str, str] | None = None) -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun / accelerate environment variables."""
    env = dict(os.environ if env is None else env)
    try:
        world = int(env.get("WORLD_SIZE", "1") or 1)
        rank = int(env.get("RANK", env.get("LOCAL_RANK", "0")) or 0)
        local = int(env.get("LOCAL_RANK", str(rank)) or 0)
    except ValueError as e:
        raise ConfigError(f"bad RANK/WORLD_SIZE/LOCAL_RANK in the environment: {e}") from e
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} is not within WORLD_SIZE={world}")
    return rank, world, local


def shard_of(samples: list[Sample], rank: int, world: int) -> list[Sample]:
    return [s for i, s in enumerate(samples) if i % world == rank]


def _ids_sha(samples: Iterable[Sample]) -> str:
    return hashlib.sha256("\n".join(s.id for s in samples).encode()).hexdigest()


# ----------------------------------------------------------------------------------------------
# JSONL rows
# ----------------------------------------------------------------------------------------------


def read_jsonl_rows(path: str | os.PathLike) -> tuple[list[dict[str, Any]], int, list[str]]:
    """Rows of a JSONL file, the byte length of its well-formed prefix, and problems found.

    A last line without its newline (a write cut by a kill) is torn: it is not returned and
    the prefix length stops before it, so the writer can truncate and go on. Other invalid
    lines are skipped and reported.
    """
    p = Path(path)
    if not p.exists():
        return [], 0, []
    data = p.read_bytes()
    rows: list[dict[str, Any]] = []
    problems: list[str] = []
    pos = 0
    good_end = 0
    lineno = 0
    while pos < len(data):
        nl = data.find(b"\n", pos)
        lineno += 1
        if nl == -1:
            problems.append(f"line {lineno}: torn last line ({len(data) - pos} bytes) ignored")
            break
        chunk = data[pos:nl]
        pos = nl + 1
        if chunk.strip():
            try:
                obj = json.loads(chunk)
                if not isinstance(obj, dict) or "id" not in obj:
                    raise ValueError("not an object with an id")
                rows.append(obj)
            except ValueError as e:
                problems.append(f"line {lineno}: invalid row skipped ({e})")
        good_end = pos
    return rows, good_end, problems


class _RankWriter:
    def __init__(self, path: Path) -> None:
        self.path = path
        rows, good_end, problems = read_jsonl_rows(path)
        if path.exists() and path.stat().st_size != good_end:
            with path.open("r+b") as f:  # drop a torn last line before appending
                f.truncate(good_end)
        self.rows = rows
        self.problems = problems
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, row: dict[str, Any]) -> None:
        data = (json.dumps(row, ensure_ascii=False, default=str) + "\n").encode("utf-8")
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]

    def close(self) -> None:
        os.close(self.fd)


def load_predictions(path: str | os.PathLike) -> tuple[dict[str, Prediction], list[str]]:
    """Predictions file (`{"id", "output"}` per line, or runner rows) -> {id: Prediction}."""
    p = Path(path)
    if not p.is_file():
        raise BenchmarkDataError(f"predictions file not found: {p}")
    rows, _, problems = read_jsonl_rows(p)
    bad = [x for x in problems if "torn" not in x]
    if bad:
        raise BenchmarkDataError(f"{p}: {bad[0]}")
    preds: dict[str, Prediction] = {}
    notes = list(problems)
    dup = 0
    for r in rows:
        if r.get("id") is None:
            raise BenchmarkDataError(f"{p}: a prediction row has no id")
        pr = Prediction.from_row(r)
        if pr.id in preds:
            dup += 1
        preds[pr.id] = pr  # later rows supersede earlier ones
    if dup:
        notes.append(f"{dup} duplicate prediction ids: the last row of each was used")
    if not rows:
        raise BenchmarkDataError(f"no predictions in {p}")
    return preds, notes


# ----------------------------------------------------------------------------------------------
# pipeline
# ----------------------------------------------------------------------------------------------


def _resolve_device(device: str | None, local_rank: int) -> str:
    if device and device != "auto":
        return device
    try:
        import torch

        if torch.cuda.is_available():
            return f"cuda:{local_rank}"
    except Exception:  # pragma: no cover
        pass
    return "cpu"


def make_pipeline(cfg: EvalConfig, device: str):
    hook = os.environ.get(PIPELINE_HOOK_ENV)
    if hook:
        mod_name, _, attr = hook.partition(":")
        cls = getattr(importlib.import_module(mod_name), attr or "Pipeline")
    else:
        from uhrbat.pipeline import UhrBatPipeline as cls  # the real model
    kwargs: dict[str, Any] = {"device": device}
    if cfg.dtype:
        kwargs["dtype"] = cfg.dtype
    kwargs.update(cfg.selection())
    return cls.from_pretrained(cfg.model, **kwargs)


def _image_input(refs: list[ImageRef]):
    """What the pipeline gets: a path for one file (it loads it), else a decoded PIL image."""
    if len(refs) == 1 and refs[0].path is not None:
        refs[0].check()
        return refs[0].path
    return open_images(refs)


# ----------------------------------------------------------------------------------------------
# the loop
# ----------------------------------------------------------------------------------------------


def _fingerprint(cfg: EvalConfig, max_new_tokens: int) -> dict[str, Any]:
    return {
        "benchmark": benchmarks.get_spec(cfg.benchmark).name,
        "data": str(Path(cfg.data).expanduser().absolute()),
        "images": str(Path(cfg.images).expanduser().absolute()) if cfg.images else None,
        "model": cfg.model,
        "prompt": cfg.prompt,
        "selection": cfg.selection(),
        "dtype": cfg.dtype,
        "max_new_tokens": max_new_tokens,
        "choice_by_logits": cfg.choice_by_logits,
        "decoding": "greedy",
    }


def _check_run_json(out: Path, fp: dict[str, Any], rank: int) -> None:
    path = out / "run.json"
    if path.exists():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = None
        if isinstance(old, dict):
            diff = [k for k in fp if old.get(k) != fp[k]]
            if diff:
                k = diff[0]
                raise ConfigError(f"{out} holds a run with different settings ({k}: {old.get(k)!r} != {fp[k]!r}); "
                                  "use a new --out directory")
            return
    if rank == 0:
        atomic_write_text(path, json.dumps(fp, indent=2) + "\n")


def _progress(enabled: bool):
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("elapsed"),
                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                    console=Console(stderr=True), disable=not enabled, transient=False)


def _base_row(s: Sample, prompt: str, rank: int) -> dict[str, Any]:
    return {"id": s.id, "row": s.row, "prompt": prompt, "output": None, "parsed": None, "correct": False,
            "error": None, "timings": {}, "num_visual_tokens": None, "latency_s": None, "n_images": len(s.images),
            "rank": rank}


def _judge(module, s: Sample, output: str) -> tuple[Any, bool]:
    parsed = module.extract(output, s)
    return parsed, bool(module.correct(parsed, s))


@dataclass
class _State:
    successes: int = 0


def _process_batch(pipe, batch: list[Sample], cfg: EvalConfig, module, max_new_tokens: int, rank: int,
                   write: Callable[[dict[str, Any]], None], state: _State | None = None) -> None:
    """Answer one batch and write one row per sample.

    Per-sample failures (bad image, prompt too long, any error once the model has answered at
    least once) become error rows. An unexpected exception before the model has ever answered
    (a broken install, a bad checkpoint) aborts the run instead, without writing a row, so a
    systematic failure is not recorded as thousands of wrong answers and the rerun retries it.
    """
    state = state if state is not None else _State()
    ready: list[tuple[Sample, str, Any, dict[str, Any]]] = []
    for s in batch:
        prompt = prompts.build_prompt(cfg.benchmark, s, cfg.prompt) if s.ok else s.question
        row = _base_row(s, prompt, rank)
        if not s.ok:
            row["error"] = s.error
            write(row)
            continue
        try:
            image = _image_input(s.images)
        except UhrBatError as e:
            row["error"] = f"{type(e).__name__}: {e}"
            write(row)
            continue
        ready.append((s, prompt, image, row))
    if not ready:
        return

    results: list[Any] | None = None
    t0 = time.perf_counter()
    if len(ready) > 1:
        try:
            results = list(pipe.ask_batch([r[2] for r in ready], [r[1] for r in ready], max_new_tokens=max_new_tokens,
                                          **cfg.generate_kwargs))
            if len(results) != len(ready):
                results = None
        except Exception:  # isolate the failing sample below
            results = None
    batch_latency = (time.perf_counter() - t0) / len(ready) if results is not None else None

    for i, (s, prompt, image, row) in enumerate(ready):
        try:
            if results is not None:
                res, latency = results[i], batch_latency
            else:
                t1 = time.perf_counter()
                res = pipe.ask(image, prompt, max_new_tokens=max_new_tokens, **cfg.generate_kwargs)
                latency = time.perf_counter() - t1
            answer = res.answer if res.answer is not None else ""
            row.update(output=answer, timings=dict(getattr(res, "timings", {}) or {}),
                       num_visual_tokens=getattr(res, "num_visual_tokens", None), latency_s=latency)
            row["parsed"], row["correct"] = _judge(module, s, answer)
            if cfg.choice_by_logits and s.options:
                try:
                    lp = pipe.choice_logprobs(image, prompt, list(s.options))
                    row["logprobs"] = {k: float(v) for k, v in lp.items()}
                    row["logit_choice"] = max(lp, key=lambda k: lp[k]) if lp else None
                except UhrBatError as e:  # the generated answer stays valid
                    row["logit_choice"] = None
                    row["logit_error"] = f"{type(e).__name__}: {e}"
        except KeyboardInterrupt:
            raise
        except Exception as e:
            if state.successes == 0 and not isinstance(e, UhrBatError):
                raise
            row.update(output=None, parsed=None, correct=False, error=f"{type(e).__name__}: {e}")
        else:
            state.successes += 1
        write(row)


def _marker(out: Path, rank: int, world: int) -> Path:
    return out / f".rank{rank}-of-{world}.done"


def _rank_file(out: Path, rank: int, world: int) -> Path:
    return out / f"predictions.rank{rank}-of-{world}.jsonl"


def _collect(out: Path, exclude: Path | None = None) -> dict[str, dict[str, Any]]:
    """Rows from every rank file (any world size), later rows superseding earlier ones."""
    merged: dict[str, dict[str, Any]] = {}
    for f in sorted(out.glob("predictions.rank*-of-*.jsonl")):
        if exclude is not None and f == exclude:
            continue
        rows, _, _ = read_jsonl_rows(f)
        for r in rows:
            merged[str(r["id"])] = r
    return merged


def run_eval(cfg: EvalConfig, env: dict[str, str] | None = None) -> Report | None:
    """Run (or resume) an evaluation; returns the report on rank 0, None on other ranks."""
    spec = benchmarks.get_spec(cfg.benchmark)
    cfg.benchmark = spec.name
    if cfg.prompt not in prompts.PROMPT_STYLES:
        raise ConfigError(f"unknown prompt style {cfg.prompt!r}; choose one of {', '.join(prompts.PROMPT_STYLES)}")
    if cfg.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {cfg.batch_size}")
    if cfg.limit is not None and cfg.limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {cfg.limit}")
    if cfg.choice_by_logits and not spec.multiple_choice:
        raise ConfigError(f"--choice-by-logits needs a multiple-choice benchmark; {spec.name} is open-ended")
    max_new_tokens = cfg.max_new_tokens or spec.max_new_tokens
    rank, world, local_rank = dist_info(env)
    module = benchmarks.scorer(spec.name)

    samples = load_benchmark(spec.name, cfg.data, cfg.images)
    if cfg.limit is not None:
        samples = samples[: cfg.limit]
    out = Path(cfg.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    fp = _fingerprint(cfg, max_new_tokens)
    _check_run_json(out, fp, rank)

    my_shard = shard_of(samples, rank, world)
    marker = _marker(out, rank, world)
    if marker.exists():
        marker.unlink()
    writer = _RankWriter(_rank_file(out, rank, world))
    for prob in writer.problems:
        print(f"[rank {rank}] {writer.path.name}: {prob}", file=sys.stderr)
    done_rows = _collect(out)
    done = {sid for sid, r in done_rows.items() if not (cfg.retry_errors and r.get("error") and not _is_data_error(r))}
    todo = [s for s in my_shard if s.id not in done]

    pipe = None
    state = _State()
    try:
        with _progress(cfg.progress) as progress:
            task = progress.add_task(f"{spec.name} rank {rank}/{world}", total=len(my_shard), completed=len(my_shard) - len(todo))

            def write(row: dict[str, Any]) -> None:
                writer.write(row)
                progress.advance(task)

            for start in range(0, len(todo), cfg.batch_size):
                batch = todo[start: start + cfg.batch_size]
                if pipe is None and any(s.ok for s in batch):
                    pipe = make_pipeline(cfg, _resolve_device(cfg.device, local_rank))
                _process_batch(pipe, batch, cfg, module, max_new_tokens, rank, write, state)
    finally:
        writer.close()

    atomic_write_text(marker, json.dumps({"rank": rank, "world": world, "n": len(my_shard),
                                          "ids_sha": _ids_sha(my_shard)}) + "\n")
    if rank != 0:
        return None
    _wait_for_ranks(out, samples, world)
    return _merge_and_report(cfg, out, samples, module, spec, fp, world)


def _is_data_error(row: dict[str, Any]) -> bool:
    return str(row.get("error", "")).startswith("row ")


def _wait_for_ranks(out: Path, samples: list[Sample], world: int) -> None:
    timeout = float(os.environ.get(MERGE_TIMEOUT_ENV, "86400"))
    deadline = time.monotonic() + timeout
    expected = {r: _ids_sha(shard_of(samples, r, world)) for r in range(world)}
    announced = False
    while True:
        missing = []
        for r, sha in expected.items():
            m = _marker(out, r, world)
            try:
                ok = json.loads(m.read_text()).get("ids_sha") == sha
            except (OSError, ValueError):
                ok = False
            if not ok:
                missing.append(r)
        if not missing:
            return
        if time.monotonic() > deadline:
            raise EvalIncomplete(f"ranks {missing} of {world} have not finished in {out}; rerun the same command to resume and merge")
        if not announced:
            print(f"[rank 0] waiting for ranks {missing} to finish before merging", file=sys.stderr)
            announced = True
        time.sleep(1.0)


def _merge_and_report(cfg: EvalConfig, out: Path, samples: list[Sample], module, spec, fp: dict[str, Any],
                      world: int) -> Report:
    rows = _collect(out)
    missing = [s.id for s in samples if s.id not in rows]
    if missing:
        raise EvalIncomplete(f"{len(missing)} samples have no row in {out} (e.g. {missing[:3]}); rerun the same command")
    ordered = [rows[s.id] for s in samples]
    atomic_write_text(out / PREDICTIONS, "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in ordered))
    preds = {str(r["id"]): Prediction.from_row(r) for r in ordered}
    report = benchmarks.score(spec.name, samples, preds)
    lat = [r["latency_s"] for r in ordered if isinstance(r.get("latency_s"), (int, float))]
    vis = [r["num_visual_tokens"] for r in ordered if isinstance(r.get("num_visual_tokens"), (int, float))]
    if lat:
        report.metrics["runtime/mean_latency_s"] = sum(lat) / len(lat)
    if vis:
        report.metrics["runtime/mean_visual_tokens"] = sum(vis) / len(vis)
    stages: dict[str, list[float]] = {}
    for r in ordered:
        for k, v in (r.get("timings") or {}).items():
            if isinstance(v, (int, float)):
                stages.setdefault(k, []).append(float(v))
    for k, v in stages.items():
        report.metrics[f"runtime/mean_{k}_s"] = sum(v) / len(v)
    n_multi = sum(1 for s in samples if s.ok and len(s.images) > 1)
    report.meta.update({
        "prompt_style": cfg.prompt,
        "prompt_template": prompts.describe(spec.name, cfg.prompt),
        "model": cfg.model,
        "selection": cfg.selection() or "pipeline defaults",
        "decoding": "greedy",
        "max_new_tokens": fp["max_new_tokens"],
        "max_new_tokens_source": spec.max_new_tokens_source if cfg.max_new_tokens is None else "--max-new-tokens",
        "world_size": world,
        "limit": cfg.limit,
        "data": fp["data"],
    })
    if n_multi:
        report.meta["multi_image"] = (f"{n_multi} questions have several images; they were pasted side by side into one "
                                      "image (the pipeline takes one image per question)")
    write_report(report, out)
    return report
