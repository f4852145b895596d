"""`uhrbat eval` (run a model on a benchmark) and `uhrbat score` (score saved predictions)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from uhrbat.errors import BenchmarkDataError, ConfigError

_BENCH_HELP = "Benchmark: xlrs, mme-realworld-rs, rshr, hrbench-4k, hrbench-8k, lrs-vqa."


def _parse_budgets(text: Optional[str]) -> list[int] | None:
    if text is None:
        return None
    try:
        vals = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError as e:
        raise ConfigError(f"--budgets must be comma-separated integers, got {text!r}") from e
    if not vals or any(v < 0 for v in vals):
        raise ConfigError(f"--budgets must be non-negative integers, got {text!r}")
    return vals


def eval_command(
    benchmark: str = typer.Option(..., "--benchmark", "-b", help=_BENCH_HELP),
    data: Path = typer.Option(..., "--data", help="Benchmark annotation file (json/jsonl/parquet/tsv) or its folder."),
    model: str = typer.Option(..., "--model", "-m", help="Model folder or hub id for UhrBatPipeline.from_pretrained."),
    out: Path = typer.Option(..., "--out", "-o", help="Run directory (created; rerunning the same command resumes)."),
    images: Optional[Path] = typer.Option(None, "--images", help="Root that relative image paths resolve in (default: the data file's folder)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N questions (smoke runs)."),
    batch_size: int = typer.Option(1, "--batch-size", help="Questions per ask_batch call."),
    prompt: str = typer.Option("official", "--prompt", help="official (the benchmark's own prompt) or reference (the UHR-BAT reference evaluator's)."),
    choice_by_logits: bool = typer.Option(False, "--choice-by-logits", help="Also pick the option whose letter has the highest first-token log-probability (reported separately)."),
    budgets: Optional[str] = typer.Option(None, "--budgets", help="Per-scale token budgets, e.g. 80,320,600,2000."),
    selector: Optional[str] = typer.Option(None, "--selector", help="Token selector: kmeans, segments or topk."),
    clusters: Optional[int] = typer.Option(None, "--clusters", help="K-Means clusters per scale."),
    iters: Optional[int] = typer.Option(None, "--iters", help="K-Means iterations."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Selection seed."),
    device: str = typer.Option("auto", "--device", help="auto (cuda:LOCAL_RANK if available, else cpu), cpu, cuda:0, ..."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Model dtype (e.g. bfloat16, float16, float32)."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="Generation length (default: the benchmark's official setting)."),
    retry_errors: bool = typer.Option(False, "--retry-errors", help="On resume, run again the questions whose rows are model/image errors."),
    no_progress: bool = typer.Option(False, "--no-progress", help="Do not draw the progress bar."),
) -> None:
    """Run a model on a benchmark: resumable, batched, sharded under torchrun / accelerate launch."""
    from uhrbat.evaluation.runner import EvalConfig, run_eval

    if selector is not None and selector not in ("kmeans", "segments", "topk"):
        raise ConfigError(f"--selector must be kmeans, segments or topk, got {selector!r}")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ConfigError("--max-new-tokens must be >= 1")
    cfg = EvalConfig(
        benchmark=benchmark, data=data, out=out, model=model, images=images, limit=limit, batch_size=batch_size,
        prompt=prompt, choice_by_logits=choice_by_logits, budgets=_parse_budgets(budgets), selector=selector,
        clusters=clusters, iters=iters, seed=seed, device=device, dtype=dtype, max_new_tokens=max_new_tokens,
        retry_errors=retry_errors, progress=not no_progress,
    )
    report = run_eval(cfg)
    if report is None:
        typer.echo(f"this rank finished its shard in {out}; rank 0 merges and writes the report", err=True)
        return
    _print_summary(report, out)


def score_command(
    benchmark: str = typer.Option(..., "--benchmark", "-b", help=_BENCH_HELP),
    data: Path = typer.Option(..., "--data", help="Benchmark annotation file (json/jsonl/parquet/tsv) or its folder."),
    predictions: Path = typer.Option(..., "--predictions", "-p", help='JSONL with one {"id": ..., "output": "raw model text"} per line.'),
    images: Optional[Path] = typer.Option(None, "--images", help="Image root; when given, rows whose images cannot be found count as errors (default: images are not checked)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as one JSON object."),
) -> None:
    """Score saved model outputs with the benchmark's official rules (no model needed)."""
    from uhrbat.evaluation import benchmarks
    from uhrbat.evaluation.loaders import load_benchmark
    from uhrbat.evaluation.runner import load_predictions

    spec = benchmarks.get_spec(benchmark)
    samples = load_benchmark(spec.name, data, images, check_images=images is not None)
    preds, notes = load_predictions(predictions)
    report = benchmarks.score(spec.name, samples, preds)
    if notes:
        report.meta["prediction_file_notes"] = notes
    report.meta["prompt_template"] = "unknown (predictions scored offline)"
    if as_json:
        sys.stdout.write(json.dumps(report.to_dict(), ensure_ascii=False) + "\n")
        return
    _print_summary(report, None)


def _print_summary(report, out: Path | None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    t = Table(title=f"{report.benchmark}: {report.n} questions, {report.n_errors} errors (scored wrong)")
    for k in report.headline:
        t.add_column(k, justify="right")
    t.add_row(*("–" if v is None else f"{v:.2f}" for v in report.headline.values()))
    console.print(t)
    if report.per_category:
        ct = Table(title="per category")
        ct.add_column("category")
        ct.add_column("n", justify="right")
        ct.add_column("accuracy (%)", justify="right")
        for k, v in report.per_category.items():
            ct.add_row(k, str(v["n"]), f"{v['accuracy']:.2f}")
        console.print(ct)
    if out is not None:
        console.print(f"report: {Path(out) / 'report.json'} and {Path(out) / 'report.md'}")


def register(app: typer.Typer) -> None:
    app.command("eval", help="Run a model on a benchmark (resumable, sharded, official prompts).")(eval_command)
    app.command("score", help="Score a predictions JSONL with the benchmark's official rules.")(score_command)


__all__ = ["register", "eval_command", "score_command", "BenchmarkDataError"]
