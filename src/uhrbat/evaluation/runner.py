"""The `uhrbat eval` loop: resumable, batched, sharded across ranks, merged at the end.

Files in the run directory:

* `run.json` — the settings that define the run; a rerun with different ones is refused, and a
  corrupt one is refused with the fix (it is never silently overwritten).
* `.lock` (rank 0) / `.lock.rank{r}` — advisory locks (`uhrbat.runfiles.RunLock`): a second run
  on the same `--out` stops at once and says which process holds it.
* `predictions.rank{r}-of-{w}.jsonl` — one row per sample, appended as produced
  (`uhrbat.runfiles.JsonlAppender`: one write + fsync per row). Every row carries
  `seq = [generation, n]`: a run's generation is one more than any generation already in the
  directory, so when rank files of several runs (even with other world sizes) hold the same id,
  the row written last wins the merge by construction. A rerun drops a torn last line and skips
  the ids already answered.
* `.rank{r}-of-{w}.done` — written when a rank has finished its shard.
* `predictions.jsonl`, `report.json`, `report.md` — written by rank 0 once every rank file is
  complete (merged by id, in benchmark order).

Scenes: questions are grouped by image. Sharding assigns whole image groups to ranks
(round-robin in order of first appearance, so shards are deterministic) and each rank answers a
group's questions back to back on one opened image, so the pipeline's scene cache prepares each
scene once; the report states the scenes prepared and an estimate of the time the cache saved.
Ranks come from `RANK` / `WORLD_SIZE` (set by `torchrun` and `accelerate launch`); each rank runs
the same command; no process group is needed.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uhrbat.errors import BenchmarkDataError, ConfigError, UhrBatError
from uhrbat.evaluation import benchmarks, prompts
from uhrbat.evaluation.loaders import load_benchmark
from uhrbat.evaluation.records import ImageRef, Prediction, Sample, open_images
from uhrbat.evaluation.report import Report, atomic_write_text, write_report
from uhrbat.runfiles import JsonlAppender, RunLock, progress_bar, read_jsonl

__all__ = [
    "EvalConfig",
    "EvalIncomplete",
    "run_eval",
    "dist_info",
    "load_predictions",
    "shard_of",
    "image_groups",
    "PIPELINE_HOOK_ENV",
]

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
    kmeans_mode: str | None = None  # fast | exact (uhrbat.cli.options --kmeans)
    compat: str | None = None  # none | reference
    attn: str | None = None  # LLM attention implementation
    vision_tower: str | None = None  # CLIP folder for reference checkpoints without one
    device: str | None = None
    dtype: str | None = None
    max_new_tokens: int | None = None
    retry_errors: bool = False
    progress: bool = True
    allow_outside_images: bool = False
    lrs_synonyms: str | None = None  # LRS-VQA only: "wordnet" (default, official) or "none" (exact match)
    generate_kwargs: dict[str, Any] = field(default_factory=dict)

    def selection(self) -> dict[str, Any]:
        sel = {
            "budgets": self.budgets,
            "selector": self.selector,
            "kmeans_clusters": self.clusters,
            "kmeans_iters": self.iters,
            "seed": self.seed,
            "kmeans_mode": self.kmeans_mode,
        }
        return {k: v for k, v in sel.items() if v is not None}

    def score_options(self) -> dict[str, Any]:
        return {"lrs_synonyms": self.lrs_synonyms}


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


def _image_key(s: Sample) -> tuple:
    """Samples with equal keys show the same image(s). Embedded images are shared bytes objects
    (the loader de-duplicates them), so their identity is their content within one process."""
    if not s.images:
        return ("no-image", s.id)
    return tuple(r.path if r.path is not None else ("data", id(r.data)) for r in s.images)


def image_groups(samples: list[Sample]) -> list[list[Sample]]:
    """Samples grouped by image, groups in order of first appearance, benchmark order inside."""
    groups: dict[tuple, list[Sample]] = {}
    for s in samples:
        groups.setdefault(_image_key(s), []).append(s)
    return list(groups.values())


def shard_of(samples: list[Sample], rank: int, world: int) -> list[Sample]:
    """This rank's samples: image group g goes to rank g % world (a scene is prepared on one rank)."""
    return [s for g, group in enumerate(image_groups(samples)) if g % world == rank for s in group]


def _ids_sha(samples: Iterable[Sample]) -> str:
    return hashlib.sha256("\n".join(s.id for s in samples).encode()).hexdigest()


# ----------------------------------------------------------------------------------------------
# rows
# ----------------------------------------------------------------------------------------------


def _row_order(row: dict[str, Any], line: int) -> tuple[int, int]:
    """Merge key: (generation, n) from `seq`; rows written before `seq` existed rank lowest."""
    seq = row.get("seq")
    if isinstance(seq, list) and len(seq) == 2 and all(isinstance(x, int) for x in seq):
        return seq[0], seq[1]
    return -1, line


def _rank_files(out: Path) -> list[Path]:
    return sorted(out.glob("predictions.rank*-of-*.jsonl"))


def _collect(out: Path) -> tuple[dict[str, dict[str, Any]], int]:
    """Latest row per id over every rank file (any world size), and the highest generation seen."""
    best: dict[str, tuple[tuple[int, int], dict[str, Any]]] = {}
    top = 0
    for f in _rank_files(out):
        rows, _ = read_jsonl(f)
        for line, r in enumerate(rows):
            if "id" not in r:
                continue
            key = _row_order(r, line)
            top = max(top, key[0])
            sid = str(r["id"])
            if sid not in best or key >= best[sid][0]:
                best[sid] = (key, r)
    return {sid: r for sid, (_, r) in best.items()}, top


def load_predictions(path: str | os.PathLike) -> tuple[dict[str, Prediction], list[str]]:
    """Predictions file (`{"id", "output"}` per line, or runner rows) -> ({id: Prediction}, notes).

    Lines that cannot be used (invalid JSON, no id) are skipped and listed in the notes; the
    file is refused only when it is missing or holds no usable row at all.
    """
    p = Path(path)
    if not p.is_file():
        raise BenchmarkDataError(f"predictions file not found: {p}")
    problems: list[str] = []
    rows, _ = read_jsonl(p, problems)
    notes = list(problems)
    preds: dict[str, Prediction] = {}
    best: dict[str, tuple[int, int]] = {}
    dup = no_id = 0
    for line, r in enumerate(rows):
        if r.get("id") is None:
            no_id += 1
            continue
        pr = Prediction.from_row(r)
        key = _row_order(r, line)
        if pr.id in preds:
            dup += 1
            if key < best[pr.id]:
                continue
        preds[pr.id], best[pr.id] = pr, key  # the latest row supersedes earlier ones
    if no_id:
        notes.append(f"{no_id} rows without an id skipped")
    if dup:
        notes.append(f"{dup} duplicate prediction ids: the latest row of each was used")
    if not preds:
        raise BenchmarkDataError(f"no usable prediction rows in {p}" + (f" ({notes[0]})" if notes else ""))
    return preds, notes


# ----------------------------------------------------------------------------------------------
# pipeline
# ----------------------------------------------------------------------------------------------


def _resolve_device(device: str | None, local_rank: int) -> str:
    if device and device != "auto":
        from uhrbat.devices import resolve_device

        return str(resolve_device(device))  # one clear line when e.g. CUDA is not available here
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
    for key, value in (("compat", cfg.compat), ("attn_implementation", cfg.attn), ("vision_tower", cfg.vision_tower)):
        if value:
            kwargs[key] = value
    kwargs.update(cfg.selection())
    return cls.from_pretrained(cfg.model, **kwargs)


class _ImageMemo:
    """The opened image of the current image group, so a group's questions share one object
    (the pipeline's scene cache then recognises it without decoding it again)."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.value: Any = None

    def get(self, s: Sample) -> Any:
        key = _image_key(s)
        if key != self.key:
            self.key, self.value = None, None  # drop the previous scene's pixels first
            self.value, self.key = _image_input(s.images), key
        return self.value


def _image_input(refs: list[ImageRef]):
    """What the pipeline gets: a path for one file (it loads it), else a decoded image."""
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
        **({"compat": cfg.compat} if cfg.compat else {}),
        "max_new_tokens": max_new_tokens,
        "choice_by_logits": cfg.choice_by_logits,
        "decoding": "greedy",
    }


def _check_run_json(out: Path, fp: dict[str, Any], rank: int) -> None:
    path = out / "run.json"
    if path.exists():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(old, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as e:
            raise ConfigError(
                f"{path} is unreadable or corrupt ({e}); it says which settings the rows in {out} were "
                "made with, so it is not overwritten: move it away to start afresh there, or use "
                "another --out"
            ) from None
        diff = [k for k in [*fp, *(k for k in old if k not in fp)] if old.get(k) != fp.get(k)]
        if diff:
            k = diff[0]
            raise ConfigError(
                f"{out} holds a run with different settings ({k}: {old.get(k)!r} != {fp.get(k)!r}); "
                "use a new --out directory"
            )
        return
    if rank == 0:
        atomic_write_text(path, json.dumps(fp, indent=2) + "\n")


def _log(rank: int, msg: str) -> None:
    print(f"[rank {rank}] {msg}", file=sys.stderr, flush=True)


def _base_row(s: Sample, prompt: str, rank: int) -> dict[str, Any]:
    return {
        "id": s.id,
        "row": s.row,
        "prompt": prompt,
        "output": None,
        "parsed": None,
        "correct": False,
        "error": None,
        "error_kind": None,
        "timings": {},
        "num_visual_tokens": None,
        "latency_s": None,
        "cache": None,
        "n_images": len(s.images),
        "rank": rank,
    }


def _judge(module, s: Sample, output: str) -> tuple[Any, bool]:
    parsed = module.extract(output, s)
    return parsed, bool(module.correct(parsed, s))


@dataclass
class _State:
    rank: int = 0
    successes: int = 0
    memo: _ImageMemo = field(default_factory=_ImageMemo)


def _process_batch(
    pipe,
    batch: list[Sample],
    cfg: EvalConfig,
    module,
    max_new_tokens: int,
    rank: int,
    write: Callable[[dict[str, Any]], None],
    state: _State | None = None,
) -> None:
    """Answer one batch and write one row per sample (stage timings and latency per sample).

    Per-sample failures (bad image, prompt too long, any error once the model has answered at
    least once) become error rows and a log line. A failed batch call is logged and its samples
    are answered one by one, so the failing sample is isolated. An unexpected exception before
    the model has ever answered (a broken install, a bad checkpoint) aborts the run instead,
    without writing a row, so a systematic failure is not recorded as thousands of wrong
    answers and the rerun retries it.
    """
    state = state if state is not None else _State(rank=rank)
    ready: list[tuple[Sample, str, Any, dict[str, Any]]] = []
    for s in batch:
        prompt = prompts.build_prompt(cfg.benchmark, s, cfg.prompt) if s.ok else s.question
        row = _base_row(s, prompt, rank)
        if not s.ok:
            row["error"], row["error_kind"] = s.error, s.error_kind or "data"
            write(row)
            continue
        try:
            image = state.memo.get(s)
        except UhrBatError as e:
            row["error"], row["error_kind"] = f"{type(e).__name__}: {e}", "image"
            _log(rank, f"{s.id}: {row['error']}")
            write(row)
            continue
        ready.append((s, prompt, image, row))
    if not ready:
        return

    results: list[Any] | None = None
    t0 = time.perf_counter()
    if len(ready) > 1:
        try:
            results = list(
                pipe.ask_batch(
                    [r[2] for r in ready], [r[1] for r in ready], max_new_tokens=max_new_tokens, **cfg.generate_kwargs
                )
            )
            if len(results) != len(ready):
                _log(
                    rank,
                    f"ask_batch returned {len(results)} answers for {len(ready)} questions; answering them one by one",
                )
                results = None
        except KeyboardInterrupt:
            raise
        except Exception as e:  # isolate the failing sample below
            _log(rank, f"a batch of {len(ready)} questions failed ({type(e).__name__}: {e}); answering them one by one")
            results = None
    # one batched call answers every question at once: each gets an equal share of its wall time
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
            row.update(
                output=answer,
                timings=dict(getattr(res, "timings", {}) or {}),
                num_visual_tokens=getattr(res, "num_visual_tokens", None),
                latency_s=latency,
                cache=getattr(res, "cache", None),
            )
            group_s = (getattr(res, "timings_detail", None) or {}).get("group")
            if isinstance(group_s, (int, float)):
                row["group_s"] = float(group_s)
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
            row.update(output=None, parsed=None, correct=False, error=f"{type(e).__name__}: {e}", error_kind="model")
            _log(rank, f"{s.id}: {row['error']}")
        else:
            state.successes += 1
        write(row)


def _marker(out: Path, rank: int, world: int) -> Path:
    return out / f".rank{rank}-of-{world}.done"


def _rank_file(out: Path, rank: int, world: int) -> Path:
    return out / f"predictions.rank{rank}-of-{world}.jsonl"


def _lock_name(rank: int) -> str:
    # rank 0 of every run takes the same lock, so two runs on one --out never overlap
    return ".lock" if rank == 0 else f".lock.rank{rank}"


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
    benchmarks.check_score_options(spec.name, **cfg.score_options())  # before any model runs
    max_new_tokens = cfg.max_new_tokens or spec.max_new_tokens
    rank, world, local_rank = dist_info(env)

    samples = load_benchmark(spec.name, cfg.data, cfg.images, allow_outside_images=cfg.allow_outside_images)
    if cfg.limit is not None:
        samples = samples[: cfg.limit]
    out = Path(cfg.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    with RunLock(out, "uhrbat eval", name=_lock_name(rank)):
        fp = _fingerprint(cfg, max_new_tokens)
        _check_run_json(out, fp, rank)
        _run_shard(cfg, spec, samples, out, rank, world, local_rank, max_new_tokens)
        if rank != 0:
            return None
        _wait_for_ranks(out, samples, world)
        return _merge_and_report(cfg, out, samples, spec, fp, world)


def _run_shard(
    cfg: EvalConfig, spec, samples: list[Sample], out: Path, rank: int, world: int, local_rank: int, max_new_tokens: int
) -> None:
    my_shard = shard_of(samples, rank, world)
    marker = _marker(out, rank, world)
    if marker.exists():
        marker.unlink()
    rank_path = _rank_file(out, rank, world)
    _, n_torn = read_jsonl(rank_path)
    if n_torn:
        _log(
            rank,
            f"{rank_path.name}: {n_torn} torn or invalid lines ignored (a killed write); their questions run again",
        )
    done_rows, top_generation = _collect(out)
    generation = top_generation + 1  # newer than every row already here: the latest row wins the merge
    # --retry-errors runs every error row again, whatever its kind: a data error is re-read from
    # the data file (cheap), an image or model error is answered again.
    done = {sid for sid, r in done_rows.items() if not (cfg.retry_errors and r.get("error"))}
    todo = [s for s in my_shard if s.id not in done]

    pipe = None
    state = _State(rank=rank)
    counter = 0
    with JsonlAppender(rank_path) as appender, progress_bar(cfg.progress) as progress:
        task = progress.add_task(
            f"{spec.name} rank {rank}/{world}", total=len(my_shard), completed=len(my_shard) - len(todo)
        )

        def write(row: dict[str, Any]) -> None:
            nonlocal counter
            row["seq"] = [generation, counter]
            counter += 1
            appender.write(row)
            progress.advance(task)

        for start in range(0, len(todo), cfg.batch_size):
            batch = todo[start : start + cfg.batch_size]
            if pipe is None and any(s.ok for s in batch):
                pipe = make_pipeline(cfg, _resolve_device(cfg.device, local_rank))
            _process_batch(pipe, batch, cfg, spec.scorer, max_new_tokens, rank, write, state)
    atomic_write_text(
        marker, json.dumps({"rank": rank, "world": world, "n": len(my_shard), "ids_sha": _ids_sha(my_shard)}) + "\n"
    )


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
            raise EvalIncomplete(
                f"ranks {missing} of {world} have not finished in {out}; rerun the same command to resume and merge"
            )
        if not announced:
            _log(0, f"waiting for ranks {missing} to finish before merging")
            announced = True
        time.sleep(1.0)


_SCENE_STAGES = ("load", "tiles", "encode")


def _scene_seconds(row: dict[str, Any]) -> float:
    """Query-independent seconds a row spent on its scene (decode, tiles, CLIP, K-Means)."""
    t = row.get("timings") or {}
    return sum(float(t.get(k, 0.0) or 0.0) for k in _SCENE_STAGES) + float(row.get("group_s", 0.0) or 0.0)


def _runtime_metrics(report: Report, ordered: list[dict[str, Any]]) -> None:
    """Per-sample means (rows hold per-sample figures) and what the scene cache did."""
    answered = [r for r in ordered if r.get("output") is not None]
    lat = [r["latency_s"] for r in answered if isinstance(r.get("latency_s"), (int, float))]
    vis = [r["num_visual_tokens"] for r in answered if isinstance(r.get("num_visual_tokens"), (int, float))]
    if lat:
        report.metrics["runtime/mean_latency_s"] = sum(lat) / len(lat)
    if vis:
        report.metrics["runtime/mean_visual_tokens"] = sum(vis) / len(vis)
    stages: dict[str, list[float]] = {}
    for r in answered:
        for k, v in (r.get("timings") or {}).items():
            if isinstance(v, (int, float)):
                stages.setdefault(k, []).append(float(v))
    for k, v in stages.items():
        report.metrics[f"runtime/mean_{k}_s"] = sum(v) / len(v)
    states = [r.get("cache") for r in answered if r.get("cache")]
    if not states:
        return
    cold = [r for r in answered if r.get("cache") in ("miss", "off")]
    warm = [r for r in answered if r.get("cache") in ("hit", "disk")]
    report.metrics["runtime/questions_answered"] = len(answered)
    report.metrics["runtime/scenes_prepared"] = len(cold)
    report.metrics["runtime/scene_cache_hits"] = sum(1 for x in states if x == "hit")
    report.metrics["runtime/scene_cache_disk_loads"] = sum(1 for x in states if x == "disk")
    note = f"{len(cold)} scenes prepared for {len(answered)} answered questions ({len(warm)} reused a prepared scene)"
    if cold and warm:
        cold_mean = sum(_scene_seconds(r) for r in cold) / len(cold)
        saved = sum(max(0.0, cold_mean - _scene_seconds(r)) for r in warm)
        report.metrics["runtime/scene_time_saved_s"] = saved
        note += (
            f"; estimated time saved {saved:.1f} s = for each reused scene, the mean scene-preparation time of "
            f"the cold questions ({cold_mean:.2f} s: load + tiles + encode + K-Means) minus what it still spent"
        )
    if "off" in states:
        note += "; the scene cache was off for some questions (every such question prepared its scene)"
    report.meta["scene_cache"] = note


def _merge_and_report(
    cfg: EvalConfig, out: Path, samples: list[Sample], spec, fp: dict[str, Any], world: int
) -> Report:
    rows, _ = _collect(out)
    missing = [s.id for s in samples if s.id not in rows]
    if missing:
        raise EvalIncomplete(
            f"{len(missing)} samples have no row in {out} (e.g. {missing[:3]}); rerun the same command"
        )
    ordered = [rows[s.id] for s in samples]
    preds = {str(r["id"]): Prediction.from_row(r) for r in ordered}
    report = benchmarks.score(spec.name, samples, preds, **cfg.score_options())
    for r in ordered:  # the report's verdict is the one truth (e.g. LRS-VQA under --lrs-synonyms none)
        r["correct"] = bool(report.per_sample.get(str(r["id"]), False))
    atomic_write_text(
        out / PREDICTIONS, "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in ordered)
    )
    _runtime_metrics(report, ordered)
    n_multi = sum(1 for s in samples if s.ok and len(s.images) > 1)
    report.meta.update(
        {
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
            "images_outside_root": "allowed (--allow-outside-images)" if cfg.allow_outside_images else "refused",
        }
    )
    if n_multi:
        report.meta["multi_image"] = (
            f"{n_multi} questions have several images; they were pasted side by side into one "
            "image (the pipeline takes one image per question)"
        )
    write_report(report, out)
    return report
