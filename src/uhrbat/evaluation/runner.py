"""The `uhrbat eval` loop: resumable, batched, sharded across ranks, merged at the end.

The questions go through the one row runner (`uhrbat.rowrunner.RowRunner`, shared with
`uhrbat batch`) with eval's plug-ins: its own image opener (embedded images, several images
pasted side by side), the benchmark's prompt, and a per-answer step that judges the answer with
the official rule and, with `--choice-by-logits`, adds the option log-probabilities. Every
`batch_size` consecutive questions make one model call (`whole_scenes=False`), so the default
`--batch-size 1` asks one question per `generate`, as the official harnesses do.

Files in the run directory (the run-file rules are `uhrbat.runfiles`'s, shared with batch):

* `run.json` — the settings that define the run; a rerun with different ones is refused, and a
  corrupt one is refused with the fix (it is never silently overwritten).
* `.lock` (rank 0) / `.lock.rank{r}` — advisory locks (`uhrbat.runfiles.RunLock`): a second run
  on the same `--out` stops at once and says which process holds it.
* `predictions.rank{r}-of-{w}.jsonl` — one row per sample, appended as produced
  (`uhrbat.runfiles.JsonlAppender`: one write + fsync per row). Every row carries
  `seq = [generation, n]`: a run's generation is one more than any generation already in the
  directory, so when rank files of several runs (even with other world sizes) hold the same id,
  the row written last wins the merge by construction. A rerun cuts a torn last line (with a
  note), refuses any other damage naming the file, line and fix (`uhrbat.runfiles.RowFile`), and
  skips the ids already answered.
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
import json
import os
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uhrbat.errors import BenchmarkDataError, ConfigError, RegionError, UhrBatError
from uhrbat.evaluation import benchmarks, prompts
from uhrbat.evaluation.records import EVAL_MAX_IMAGE_PIXELS, Prediction, Sample, open_images
from uhrbat.evaluation.report import Report, write_report
from uhrbat.evaluation.spec import BenchmarkSpec
from uhrbat.factory import load_pipeline, model_identity, pick_device
from uhrbat.rowrunner import Job, Outcome, RowRunner, error_message, hold_back_unexpected
from uhrbat.runfiles import (
    JsonlAppender,
    RowFile,
    RowProgress,
    RunLock,
    atomic_write,
    check_run_settings,
    read_jsonl,
    refuse_directories,
)

__all__ = [
    "EvalConfig",
    "EvalIncomplete",
    "run_eval",
    "dist_info",
    "load_predictions",
    "shard_of",
    "image_groups",
]

MERGE_TIMEOUT_ENV = "UHRBAT_EVAL_MERGE_TIMEOUT"
PREDICTIONS = "predictions.jsonl"


class EvalIncomplete(UhrBatError):
    """Rank 0 could not merge because another rank has not finished."""


@dataclass
class EvalConfig:
    """Everything `uhrbat eval` needs (the same shape as `uhrbat.batch.BatchConfig`).

    load: `uhrbat.factory.load_pipeline` load options (device — default "auto", cuda:LOCAL_RANK
    when available —, dtype, attn_implementation, vision_tower, compat); selection: budgets,
    selector, kmeans_clusters, kmeans_iters, kmeans_mode, seed (unset: the checkpoint's);
    score_options: the benchmark's own scoring options, passed by name to its spec (e.g. LRS-VQA's
    `lrs_synonyms`); generate_kwargs: extra generation options; region: the window every
    question asks about (`region` / `region_crs` / `region_file` reading options; a data row's
    own `region` replaces it), empty for whole images.
    """

    benchmark: str
    data: str | os.PathLike
    out: str | os.PathLike
    model: str
    images: str | os.PathLike | None = None
    limit: int | None = None
    batch_size: int = 1
    prompt: str = "official"
    choice_by_logits: bool = False
    load: dict[str, Any] = field(default_factory=dict)
    selection: dict[str, Any] = field(default_factory=dict)
    max_new_tokens: int | None = None
    retry_errors: bool = False
    progress: bool = True
    allow_outside_images: bool = False
    score_options: dict[str, Any] = field(default_factory=dict)
    generate_kwargs: dict[str, Any] = field(default_factory=dict)
    region: dict[str, Any] = field(default_factory=dict)

    def selection_options(self) -> dict[str, Any]:
        """The selection options given (None values dropped)."""
        return {k: v for k, v in self.selection.items() if v is not None}


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


def _collect(out: Path) -> tuple[dict[str, dict[str, Any]], int, list[str]]:
    """Latest row per id over every rank file (any world size), the highest generation seen, and
    the notes to print (torn last lines). Each file is read under the run files' corruption
    policy (`RowFile`: damage is refused, naming the file, line and fix)."""
    best: dict[str, tuple[tuple[int, int], dict[str, Any]]] = {}
    top = 0
    notes: list[str] = []
    for f in _rank_files(out):
        rows = RowFile(f)
        for line, r in rows.rows():
            key = _row_order(r, line)
            top = max(top, key[0])
            sid = str(r["id"])
            if sid not in best or key >= best[sid][0]:
                best[sid] = (key, r)
        if rows.torn_note():
            notes.append(rows.torn_note())
    return {sid: r for sid, (_, r) in best.items()}, top, notes


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
# eval's plug-ins of the row runner
# ----------------------------------------------------------------------------------------------


def _image_input(s: Sample, region: dict[str, Any], zoom: bool = False):
    """What the pipeline gets: a path for one file (it loads it), else a decoded image; with a
    region (the row's, else the run's), the window of the one image file, read at native
    resolution (the question's image error when it does not fit); with zoom, a decoded image is
    passed as a PIL image, so zoom can read windows of it."""
    refs = s.images
    region = s.region_kwargs() or region
    if region:
        if len(refs) != 1 or refs[0].path is None:
            raise RegionError(
                f"a region is a window of one image file; question {s.id} has "
                + (f"{len(refs)} images" if len(refs) != 1 else "an embedded image")
            )
        refs[0].check()
        from uhrbat.scene.origin import open_source

        return open_source(refs[0].path, max_pixels=EVAL_MAX_IMAGE_PIXELS, **region)
    if len(refs) == 1 and refs[0].path is not None:
        refs[0].check()
        return refs[0].path
    if zoom and len(refs) == 1:
        return refs[0].open_pil()
    return open_images(refs)


def _job(spec: BenchmarkSpec, s: Sample, style: str) -> Job:
    if not s.ok:
        return Job(id=s.id, question=s.question, error=s.error, error_kind=s.error_kind or "data", item=s)
    try:
        question = prompts.build_prompt(spec, s, style)
    except Exception as e:  # noqa: BLE001 - per-row isolation: a row the template cannot format is that row's error
        return Job(id=s.id, question=s.question, error=f"prompt: {error_message(e)}", error_kind="data", item=s)
    scene = _image_key(s) if s.region is None else (*_image_key(s), s.region, s.region_crs)
    return Job(id=s.id, question=question, scene=scene, item=s)


# ----------------------------------------------------------------------------------------------
# the loop
# ----------------------------------------------------------------------------------------------


def _fingerprint(cfg: EvalConfig, max_new_tokens: int) -> dict[str, Any]:
    return {
        "benchmark": benchmarks.get_spec(cfg.benchmark).name,
        "data": str(Path(cfg.data).expanduser().absolute()),
        "images": str(Path(cfg.images).expanduser().absolute()) if cfg.images else None,
        "model": model_identity(cfg.model),
        "prompt": cfg.prompt,
        "selection": cfg.selection_options(),
        "dtype": cfg.load.get("dtype"),
        **({"compat": cfg.load["compat"]} if cfg.load.get("compat") else {}),
        "max_new_tokens": max_new_tokens,
        "choice_by_logits": cfg.choice_by_logits,
        "decoding": "greedy",
        **({"region": cfg.region} if cfg.region else {}),
    }


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


class _Answering:
    """Eval's per-answer step (judge with the official rule; `--choice-by-logits`) and row format."""

    def __init__(self, cfg: EvalConfig, spec: BenchmarkSpec, runner: RowRunner, rank: int) -> None:
        self.cfg, self.spec, self.runner, self.rank = cfg, spec, runner, rank

    def judge(self, out: Outcome, image: Any) -> None:
        s: Sample = out.job.item
        res = out.result
        answer = res.answer if res.answer is not None else ""
        x = out.extra
        x["output"] = answer
        x["timings"] = dict(getattr(res, "timings", {}) or {})
        x["num_visual_tokens"] = getattr(res, "num_visual_tokens", None)
        x["cache"] = getattr(res, "cache", None)
        if getattr(res, "region", None) is not None:  # a region / zoom window: where, in the full image
            x["region"] = res.region
        group_s = (getattr(res, "timings_detail", None) or {}).get("group")
        if isinstance(group_s, (int, float)):
            x["group_s"] = float(group_s)
        x["parsed"], x["correct"] = _judge(self.spec.scorer, s, answer)
        if self.cfg.choice_by_logits and s.options:
            try:
                lp = self.runner.pipe.choice_logprobs(image, out.job.question, list(s.options))
                x["logprobs"] = {k: float(v) for k, v in lp.items()}
                x["logit_choice"] = max(lp, key=lambda k: lp[k]) if lp else None
            except UhrBatError as e:  # the generated answer stays valid
                x["logit_choice"] = None
                x["logit_error"] = f"{type(e).__name__}: {e}"

    def row(self, out: Outcome) -> dict[str, Any]:
        s: Sample = out.job.item
        row = _base_row(s, out.job.question, self.rank)
        if out.error is not None:
            row.update(error=out.error, error_kind=out.error_kind)
            return row
        x = out.extra
        row.update(
            output=x["output"],
            timings=x["timings"],
            num_visual_tokens=x["num_visual_tokens"],
            latency_s=out.seconds,
            cache=x["cache"],
            parsed=x["parsed"],
            correct=x["correct"],
        )
        for k in ("region", "group_s", "logprobs", "logit_choice", "logit_error"):
            if k in x:
                row[k] = x[k]
        return row


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
    prompts.describe(spec, cfg.prompt)  # a benchmark without this prompt style: refused before anything runs
    if cfg.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {cfg.batch_size}")
    if cfg.limit is not None and cfg.limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {cfg.limit}")
    if cfg.choice_by_logits and not spec.multiple_choice:
        raise ConfigError(f"--choice-by-logits needs a multiple-choice benchmark; {spec.name} is open-ended")
    if cfg.choice_by_logits and cfg.selection.get("zoom"):
        raise ConfigError("--choice-by-logits scores one scene and cannot zoom; drop --zoom or --choice-by-logits")
    benchmarks.check_score_options(spec.name, **cfg.score_options)  # before any model runs
    max_new_tokens = cfg.max_new_tokens or spec.max_new_tokens
    rank, world, local_rank = dist_info(env)

    samples = benchmarks.load_benchmark(spec.name, cfg.data, cfg.images, allow_outside_images=cfg.allow_outside_images)
    if cfg.limit is not None:
        samples = samples[: cfg.limit]
    out = Path(cfg.out).expanduser()
    with RunLock(out, "uhrbat eval", name=_lock_name(rank)):
        if rank == 0:
            refuse_directories(*(out / n for n in (PREDICTIONS, "report.json", "report.md")))
        fp = _fingerprint(cfg, max_new_tokens)
        check_run_settings(out, fp, what="eval", write=rank == 0, normalise={"model": model_identity})
        _run_shard(cfg, spec, samples, out, rank, world, local_rank, max_new_tokens)
        if rank != 0:
            return None
        _wait_for_ranks(out, samples, world)
        return _merge_and_report(cfg, out, samples, spec, fp, world)


def _run_shard(
    cfg: EvalConfig,
    spec: BenchmarkSpec,
    samples: list[Sample],
    out: Path,
    rank: int,
    world: int,
    local_rank: int,
    max_new_tokens: int,
) -> None:
    my_shard = shard_of(samples, rank, world)
    marker = _marker(out, rank, world)
    if marker.exists():
        marker.unlink()
    rank_path = _rank_file(out, rank, world)
    done_rows, top_generation, notes = _collect(out)
    for note in notes:
        _log(rank, note)
    generation = top_generation + 1  # newer than every row already here: the latest row wins the merge
    # --retry-errors runs every error row again, whatever its kind: a data error is re-read from
    # the data file (cheap), an image or model error is answered again.
    done = {sid for sid, r in done_rows.items() if not (cfg.retry_errors and r.get("error"))}
    todo = [s for s in my_shard if s.id not in done]

    def load() -> Any:
        device = pick_device(cfg.load.get("device", "auto"), local_rank)
        return load_pipeline(cfg.model, **{**cfg.load, "device": device}, **cfg.selection)

    counter = 0
    with (
        JsonlAppender(rank_path) as appender,
        RowProgress(
            cfg.progress, f"{spec.name} rank {rank}/{world}", len(my_shard), done=len(my_shard) - len(todo)
        ) as progress,
    ):
        runner = RowRunner(
            open_scene=lambda job: _image_input(job.item, cfg.region, bool(cfg.selection.get("zoom"))),
            max_new_tokens=max_new_tokens,
            ask_kwargs=dict(cfg.generate_kwargs),
            batch_size=cfg.batch_size,
            whole_scenes=False,
            load=load,
            on_loaded=progress.start_clock,
            log=lambda m: _log(rank, m),
        )
        answering = _Answering(cfg, spec, runner, rank)
        runner.finish = [(None, answering.judge)]
        outcomes = hold_back_unexpected(
            runner.run(_job(spec, s, cfg.prompt) for s in todo),
            unexpected=lambda o: o.unexpected,
            answered=lambda o: o.answered,
            log=lambda m: _log(rank, m),
        )
        for outcome in outcomes:
            row = answering.row(outcome)
            if row["error"]:
                _log(rank, f"{row['id']}: {row['error']}")
            row["seq"] = [generation, counter]
            counter += 1
            appender.write(row)
            progress.advance()
    atomic_write(
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
    rows, _, _ = _collect(out)
    missing = [s.id for s in samples if s.id not in rows]
    if missing:
        raise EvalIncomplete(
            f"{len(missing)} samples have no row in {out} (e.g. {missing[:3]}); rerun the same command"
        )
    ordered = [rows[s.id] for s in samples]
    preds = {str(r["id"]): Prediction.from_row(r) for r in ordered}
    report = benchmarks.score(spec.name, samples, preds, **cfg.score_options)
    for r in ordered:  # the report's verdict is the one truth (e.g. LRS-VQA under --lrs-synonyms none)
        r["correct"] = bool(report.per_sample.get(str(r["id"]), False))
    atomic_write(out / PREDICTIONS, "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in ordered))
    _runtime_metrics(report, ordered)
    n_multi = sum(1 for s in samples if s.ok and len(s.images) > 1)
    report.meta.update(
        {
            "prompt_style": cfg.prompt,
            "prompt_template": prompts.describe(spec, cfg.prompt),
            "model": cfg.model,
            "selection": cfg.selection_options() or "pipeline defaults",
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
