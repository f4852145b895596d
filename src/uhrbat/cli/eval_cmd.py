"""`uhrbat eval` (run a model on a benchmark) and `uhrbat score` (score saved predictions)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from uhrbat.cli import options as opt
from uhrbat.errors import BenchmarkDataError

# The names come from the registry (uhrbat.evaluation.benchmarks) only: an unknown name is refused with the list.
_BENCH_HELP = "Benchmark name or alias, as registered in uhrbat.evaluation.benchmarks (an unknown name lists them)."
_LRS_HELP = (
    "LRS-VQA only: wordnet (default, the official synonym rule; needs nltk + WordNet 3.0) or none "
    "(exact match only, a lower bound)."
)


def eval_command(
    benchmark: str = typer.Option(..., "--benchmark", "-b", help=_BENCH_HELP),
    data: Path = typer.Option(..., "--data", help="Benchmark annotation file (json/jsonl/parquet/tsv) or its folder."),
    model: opt.Model = ...,
    out: Path = typer.Option(..., "--out", "-o", help="Run directory (created; rerunning the same command resumes)."),
    images: Optional[Path] = typer.Option(
        None, "--images", help="Root that relative image paths resolve in (default: the data file's folder)."
    ),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N questions (smoke runs)."),
    batch_size: int = typer.Option(1, "--batch-size", help="Questions per ask_batch call."),
    prompt: str = typer.Option(
        "official",
        "--prompt",
        help="official (the benchmark's own prompt) or reference (the UHR-BAT reference evaluator's).",
    ),
    choice_by_logits: bool = typer.Option(
        False,
        "--choice-by-logits",
        help="Also pick the option whose letter has the highest first-token log-probability (reported separately).",
    ),
    budgets: opt.Budgets = None,
    selector: opt.Selector = None,
    clusters: opt.Clusters = None,
    iters: opt.Iters = None,
    seed: opt.Seed = None,
    kmeans: opt.KMeans = None,
    compat: opt.Compat = None,
    device: Annotated[
        str, typer.Option("--device", help="auto (cuda:LOCAL_RANK if available, else cpu), cpu, cuda:0, ...")
    ] = "auto",
    dtype: opt.Dtype = None,
    attn: opt.Attn = None,
    vision_tower: opt.VisionTower = None,
    max_new_tokens: Annotated[
        Optional[int],
        typer.Option(
            "--max-new-tokens", min=1, help="Longest answer, in tokens.  [default: the benchmark's official setting]"
        ),
    ] = None,
    retry_errors: bool = typer.Option(
        False,
        "--retry-errors",
        help="On resume, run again every question whose row is an error (image, model or data).",
    ),
    no_progress: bool = typer.Option(False, "--no-progress", help="Do not draw the progress bar."),
    allow_outside_images: bool = typer.Option(
        False,
        "--allow-outside-images",
        help="Read image paths that resolve outside --images (absolute paths, symlinks pointing out); "
        "refused by default.",
    ),
    lrs_synonyms: Optional[str] = typer.Option(None, "--lrs-synonyms", help=_LRS_HELP),
    region: opt.Region = None,
    region_crs: opt.RegionCrs = None,
    region_file: opt.RegionFile = None,
    zoom: opt.Zoom = None,
) -> None:
    """Run a model on a benchmark: resumable, batched, sharded under torchrun / accelerate launch.

    A data row may carry `region` (and `region_crs`): that question is about one window of its
    image (it replaces --region / --region-file for that row)."""
    from uhrbat.evaluation.runner import EvalConfig, run_eval
    from uhrbat.evaluation.scoring import check_not_all_errors

    # Option values were parsed and checked by uhrbat.cli.options (the same rules as `ask`).
    load = opt.load_kwargs(device=device, dtype=dtype, attn=attn, vision_tower=vision_tower, compat=compat)
    cfg = EvalConfig(
        benchmark=benchmark,
        data=data,
        out=out,
        model=model,
        images=images,
        limit=limit,
        batch_size=batch_size,
        prompt=prompt,
        choice_by_logits=choice_by_logits,
        load={k: v for k, v in load.items() if v is not None},
        selection=opt.selection_kwargs(budgets, selector, clusters, iters, seed, kmeans, zoom=zoom),
        region=opt.region_kwargs(region, region_crs, region_file),
        max_new_tokens=max_new_tokens,
        retry_errors=retry_errors,
        progress=not no_progress,
        allow_outside_images=allow_outside_images,
        score_options={"lrs_synonyms": lrs_synonyms},
    )
    report = run_eval(cfg)
    if report is None:
        typer.echo(f"this rank finished its shard in {out}; rank 0 merges and writes the report", err=True)
        return
    _print_summary(report, out)
    check_not_all_errors(report, f"the report is in {out}")


def score_command(
    benchmark: str = typer.Option(..., "--benchmark", "-b", help=_BENCH_HELP),
    data: Path = typer.Option(..., "--data", help="Benchmark annotation file (json/jsonl/parquet/tsv) or its folder."),
    predictions: Path = typer.Option(
        ..., "--predictions", "-p", help='JSONL with one {"id": ..., "output": "raw model text"} per line.'
    ),
    images: Optional[Path] = typer.Option(
        None,
        "--images",
        help="Image root; when given, rows whose images cannot be found count as errors "
        "(default: images are not checked).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the report as one JSON object."),
    allow_outside_images: bool = typer.Option(
        False, "--allow-outside-images", help="With --images: accept image paths that resolve outside it."
    ),
    lrs_synonyms: Optional[str] = typer.Option(None, "--lrs-synonyms", help=_LRS_HELP),
) -> None:
    """Score saved model outputs with the benchmark's official rules (no model needed).

    Unusable prediction lines are skipped and listed; missing and unmatched ids are listed; the
    command fails (one line, exit 2) only when every question ends up an error."""
    from uhrbat.evaluation import benchmarks
    from uhrbat.evaluation.runner import load_predictions
    from uhrbat.evaluation.scoring import check_not_all_errors

    spec = benchmarks.get_spec(benchmark)
    benchmarks.check_score_options(spec.name, lrs_synonyms=lrs_synonyms)
    samples = benchmarks.load_benchmark(
        spec.name, data, images, check_images=images is not None, allow_outside_images=allow_outside_images
    )
    preds, notes = load_predictions(predictions)
    report = benchmarks.score(spec.name, samples, preds, lrs_synonyms=lrs_synonyms)
    if notes:
        report.meta["prediction_file_notes"] = notes
    report.meta["prompt_template"] = "unknown (predictions scored offline)"
    check_not_all_errors(report, f"--predictions {predictions}")
    if as_json:
        sys.stdout.write(json.dumps(report.to_dict(), ensure_ascii=False) + "\n")
        return
    _print_summary(report, None)


def _console():
    """A console for the report: on a terminal, its width; otherwise (a file, a pipe) wide enough that
    no table row is wrapped or cut."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=1_000_000)


def _print_summary(report, out: Path | None) -> None:
    from rich.table import Table

    from uhrbat.evaluation.scoring import problem_lines

    console = _console()
    # a plain line, not a table title: rich wraps a title to the table's width
    console.print(f"{report.benchmark}: {report.n} questions, {report.n_errors} errors (scored wrong)", markup=False)
    t = Table()
    for k in report.headline:
        t.add_column(k, justify="right")
    t.add_row(*("–" if v is None else f"{v:.2f}" for v in report.headline.values()))
    console.print(t)
    for k, text in report.headline_notes().items():
        console.print(f"{k}: {text}", markup=False, highlight=False)
    if report.per_category:
        ct = Table(title="per category")
        ct.add_column("category")
        ct.add_column("n", justify="right")
        ct.add_column("accuracy (%)", justify="right")
        for k, v in report.per_category.items():
            ct.add_row(k, str(v["n"]), f"{v['accuracy']:.2f}")
        console.print(ct)
    for line in problem_lines(report):
        console.print(line, markup=False, highlight=False)
    if out is not None:
        files = ", ".join(str(Path(out) / n) for n in ("predictions.jsonl", "report.json", "report.md"))
        console.print(f"wrote {files}", markup=False, highlight=False)


def register(app: typer.Typer) -> None:
    app.command("eval", help="Run a model on a benchmark (resumable, sharded, official prompts).")(eval_command)
    app.command("score", help="Score a predictions JSONL with the benchmark's official rules.")(score_command)


__all__ = ["register", "eval_command", "score_command", "BenchmarkDataError"]
