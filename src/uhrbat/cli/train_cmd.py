"""`uhrbat train`, `uhrbat data prepare-sft` and `uhrbat masks`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer

from uhrbat.errors import ConfigError

data_app = typer.Typer(name="data", help="Prepare training data.", no_args_is_help=True, add_completion=False)


@data_app.command("prepare-sft")
def prepare_sft_command(
    inputs: list[Path] = typer.Argument(
        ...,
        help="SFT parquet (or its dataset folder, e.g. UHR-BAT-SFT-10K/ or .../train/) and/or LLaVA JSON/JSONL files.",
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Manifest to write (.jsonl)."),
    image_root: Optional[Path] = typer.Option(
        None,
        "--image-root",
        help="Folder relative image paths live in (default: images/ beside the parquet, the JSON file's folder).",
    ),
    masks: Optional[Path] = typer.Option(
        None, "--masks", help="Folder of per-image segment masks (`uhrbat masks` output, or the reference's .pt files)."
    ),
    keep_prefix: bool = typer.Option(
        False, "--keep-images-prefix", help="Do not strip a leading 'images/' from parquet image paths."
    ),
    verify: str = typer.Option(
        "header",
        "--verify",
        help="header (the header parses and a PNG/JPEG file is complete; pixels are not decoded), "
        "full (decode every image) or none (existence only).",
    ),
    relative: bool = typer.Option(False, "--relative", help="Write paths relative to the manifest's folder."),
    bad_rows: Optional[Path] = typer.Option(
        None, "--bad-rows", help="Write the skipped rows and reasons here (JSONL)."
    ),
    scales: str = typer.Option("672,1344,2688,4032", "--scales", help="Pyramid sides the masks must cover."),
    show: int = typer.Option(20, "--show", help="Print at most this many bad rows."),
) -> None:
    """Convert the released SFT parquet and LLaVA-style JSON into one validated JSONL manifest."""
    from uhrbat.training.data import prepare_sft

    try:
        scale_list = [int(s) for s in scales.split(",") if s.strip()] or None
    except ValueError as e:
        raise ConfigError(f"--scales must be comma-separated integers, got {scales!r}") from e
    report = prepare_sft(
        [str(p) for p in inputs],
        out,
        image_root=image_root,
        mask_dir=masks,
        strip_prefix=None if keep_prefix else "images/",
        scales=scale_list,
        verify=verify,
        relative=relative,
        bad_rows=bad_rows,
    )
    for b in report.bad[:show]:
        typer.echo(f"skipped {b}", err=True)
    if report.skipped > show:
        typer.echo(
            f"... and {report.skipped - show} more bad rows" + (f" (all in {bad_rows})" if bad_rows else ""), err=True
        )
    typer.echo(f"{out}: {report.summary()}", err=True)
    if report.written == 0:
        # (an error, not typer.Exit: `uhrbat.cli.main.main` runs click with standalone_mode=False)
        raise ConfigError(f"no usable sample in {', '.join(str(p) for p in inputs)}; {out} is empty")


def train_command(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Recipe YAML (e.g. recipes/uhrbat-sft.yaml)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Starting checkpoint (this package's format)."),
    data: Optional[str] = typer.Option(None, "--data", help="Training manifest from `uhrbat data prepare-sft`."),
    output_dir: Optional[str] = typer.Option(None, "--output-dir", "-o", help="Run folder (checkpoints, final model)."),
    train: Optional[str] = typer.Option(
        None, "--train", help="Trained parts: vision_projector,token_mlp,llm,scale_residuals."
    ),
    lora: Optional[int] = typer.Option(None, "--lora", help="LoRA rank on the LLM (0 = full fine-tuning)."),
    qlora: Optional[str] = typer.Option(
        None, "--qlora", help="Quantize the LLM for QLoRA: 4bit or 8bit (CUDA, bitsandbytes)."
    ),
    deepspeed: Optional[str] = typer.Option(
        None, "--deepspeed", help="zero2 | zero2_offload | zero3 | zero3_offload | none | a JSON path."
    ),
    fsdp: Optional[str] = typer.Option(
        None, "--fsdp", help='FSDP mode, e.g. "full_shard auto_wrap" (disables DeepSpeed).'
    ),
    budgets: Optional[str] = typer.Option(None, "--budgets", help="Visual tokens per scale, e.g. 80,320,600,2000."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps"),
    learning_rate: Optional[float] = typer.Option(None, "--learning-rate", "--lr"),
    resume: Optional[str] = typer.Option(
        None, "--resume", help="auto (latest checkpoint in --output-dir), never, or a checkpoint folder."
    ),
    compat: Optional[str] = typer.Option(
        None,
        "--compat",
        help="none | reference (two newlines after the image, reference labels, answer-leaking relevance query).",
    ),
    overrides: list[str] = typer.Option(
        [], "--set", help="Recipe override key=value (YAML value), repeatable: --set lora.alpha=32."
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved recipe and exit."),
    summary: Optional[Path] = typer.Option(
        None, "--summary", help="Write a JSON summary (steps, per-step losses, engine) here."
    ),
) -> None:
    """Fine-tune UHR-BAT (HF Trainer; DeepSpeed / FSDP; resumes from the latest checkpoint)."""
    from uhrbat.training.recipe import load_recipe

    named = {
        "model": model,
        "data": data,
        "output_dir": output_dir,
        "train": train,
        "lora.r": lora,
        "lora.quantize": qlora,
        "fsdp": fsdp,
        "max_steps": max_steps,
        "learning_rate": learning_rate,
        "resume": resume,
        "compat": compat,
    }
    if budgets is not None:
        named["budgets"] = budgets  # parsed by the one budget parser (`parse_budgets`) in build_recipe
    if fsdp is not None:
        named["deepspeed"] = deepspeed or "none"
    elif deepspeed is not None:
        named["deepspeed"] = deepspeed
    recipe = load_recipe(config, overrides, **named)
    if dry_run:
        typer.echo(json.dumps(recipe.to_dict(), indent=2, default=str))
        for problem in recipe.machine_problems():
            typer.echo(f"will not run on this machine: {problem}", err=True)
        return
    from uhrbat.training.trainer import run_training

    res = run_training(recipe)
    if summary is not None and int(os.environ.get("RANK", "0")) == 0:
        summary.parent.mkdir(parents=True, exist_ok=True)
        summary.write_text(json.dumps(res.to_json(), indent=2, default=str) + "\n")
    eng = res.engine
    msg = f"trained {res.global_step} steps ({eng.get('engine')}"
    if eng.get("engine") == "deepspeed":
        msg += f" ZeRO-{eng.get('zero_stage')}, optimizer offload {eng.get('offload_optimizer')}"
    msg += f", world size {eng.get('world_size')}); model in {res.output_dir}"
    if res.resumed_from:
        msg += f" (resumed from {res.resumed_from})"
    if res.dropped:
        msg += f"; {res.dropped} samples dropped (see {Path(res.output_dir) / 'dropped_samples.jsonl'})"
    typer.echo(msg, err=True)


def masks_command(
    images: Path = typer.Option(..., "--images", help="Folder of images (searched recursively)."),
    out: Path = typer.Option(..., "--out", help="Output folder: one <sanitized relative path>.safetensors per image."),
    sam: str = typer.Option(
        ..., "--sam", help="SAM checkpoint folder (transformers SamModel, e.g. facebook/sam-vit-huge)."
    ),
    scales: str = typer.Option("672,1344,2688,4032", "--scales", help="Pyramid sides to write tile masks for."),
    points_per_side: int = typer.Option(32, "--points-per-side", help="Grid of point prompts per side."),
    points_per_batch: int = typer.Option(64, "--points-per-batch"),
    pred_iou_thresh: float = typer.Option(0.88, "--pred-iou-thresh"),
    stability_thresh: float = typer.Option(0.95, "--stability-thresh"),
    nms_thresh: float = typer.Option(0.7, "--nms-thresh", help="Box IoU above which the lower-scored mask is dropped."),
    min_area: int = typer.Option(0, "--min-area", help="Drop masks smaller than this (pixels of the working map)."),
    resolution: int = typer.Option(1024, "--resolution", help="Side of the square working label map."),
    keep_pixels: bool = typer.Option(False, "--keep-pixels", help="Also store the working label map (key 'pixels')."),
    device: str = typer.Option("cpu", "--device"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="fp32 | bf16 | fp16 for SAM."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N images (in sorted order)."),
) -> None:
    """Per-image SAM segment-id maps in the tile format (resumable: existing outputs are skipped)."""
    from uhrbat.training.masks import MaskSettings, generate_masks

    try:
        scale_list = [int(s) for s in scales.split(",") if s.strip()]
    except ValueError as e:
        raise ConfigError(f"--scales must be comma-separated integers, got {scales!r}") from e
    settings = MaskSettings(
        points_per_side=points_per_side,
        points_per_batch=points_per_batch,
        pred_iou_thresh=pred_iou_thresh,
        stability_score_thresh=stability_thresh,
        box_nms_thresh=nms_thresh,
        min_mask_area=min_area,
        resolution=resolution,
    )
    rep = generate_masks(
        images,
        out,
        sam,
        scales=scale_list,
        settings=settings,
        device=device,
        dtype=dtype,
        keep_pixels=keep_pixels,
        limit=limit,
        progress=lambda m: typer.echo(m, err=True),
    )
    typer.echo(f"{out}: {rep.summary()}", err=True)
    for rel, why in rep.failed:
        typer.echo(f"failed {rel}: {why}", err=True)
    if rep.failed and not rep.written and not rep.skipped:
        raise ConfigError(f"every image failed ({len(rep.failed)}), e.g. {rep.failed[0][0]}: {rep.failed[0][1]}")


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")
    app.command("train")(train_command)
    app.command("masks")(masks_command)
