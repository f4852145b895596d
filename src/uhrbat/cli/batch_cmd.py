"""`uhrbat batch`: a question list over an image archive, in-process or on a Ray cluster."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from uhrbat.cli import options as o
from uhrbat.errors import ConfigError
from uhrbat.modeling.hub import DEFAULT_MODEL


def batch(
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            file_okay=False,
            metavar="DIR",
            help="Run folder: predictions.jsonl (one row per id), run.json, summary.json; "
            "rerunning the same command resumes.",
        ),
    ],
    input: Annotated[
        Path | None,
        typer.Option(
            "--input",
            "-i",
            dir_okay=False,
            metavar="FILE",
            help="Question list: .jsonl/.json/.csv/.tsv/.parquet with `image` and `question` columns (optional `id`; "
            "otherwise a stable hash of image+question).",
        ),
    ] = None,
    images: Annotated[
        str | None,
        typer.Option(
            "--images",
            metavar="DIR|GLOB",
            help="Every image under a folder (recursive) or matching a glob, each asked --question.",
        ),
    ] = None,
    question: Annotated[str | None, typer.Option("--question", "-q", help="The question for --images.")] = None,
    image_root: Annotated[
        Path | None,
        typer.Option(
            "--image-root",
            file_okay=False,
            metavar="DIR",
            help="Folder that relative image paths resolve in.  [default: the list's folder]",
        ),
    ] = None,
    untrusted: Annotated[
        bool,
        typer.Option(
            "--untrusted",
            help="The list comes from someone else: paths must stay inside the image root (no absolute paths, "
            "no .., no VRT) and images are decoded by the untrusted reader.",
        ),
    ] = False,
    engine: Annotated[
        Literal["local", "ray"],
        typer.Option(  # type: ignore[valid-type]
            "--engine", help="local: in this process; ray: Ray Data actors (pip install -e '.[ray]')."
        ),
    ] = "local",
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=1, help="One-question scenes answered together in one generate call.")
    ] = 1,
    geojson_dir: Annotated[
        Path | None,
        typer.Option(
            "--geojson-dir",
            file_okay=False,
            metavar="DIR",
            help="Write each row's kept tokens as DIR/<id>.geojson (lon/lat when the image is georeferenced).",
        ),
    ] = None,
    parquet: Annotated[bool, typer.Option("--parquet", help="Also write predictions.parquet at the end.")] = False,
    ray_address: Annotated[
        str | None,
        typer.Option(
            "--ray-address",
            metavar="ADDR",
            help="Ray cluster to join (e.g. ray://head:10001 or auto).  [default: $RAY_ADDRESS, else a local Ray]",
        ),
    ] = None,
    actors: Annotated[int, typer.Option("--actors", min=1, help="Ray: model-holding actors (one per GPU).")] = 1,
    gpus_per_actor: Annotated[
        float, typer.Option("--gpus-per-actor", min=0.0, help="Ray: GPUs per actor (> 0 runs each actor on cuda).")
    ] = 0.0,
    cpus_per_actor: Annotated[
        float, typer.Option("--cpus-per-actor", min=0.0, help="Ray: CPUs per actor (also its torch threads on CPU).")
    ] = 1.0,
    ray_cpus: Annotated[
        int | None,
        typer.Option("--ray-cpus", min=1, help="CPUs of a local Ray started by this command.  [default: all]"),
    ] = None,
    retry_errors: Annotated[
        bool,
        typer.Option(
            "--retry-errors",
            help="On resume, answer again every id whose row is an error (its new row replaces the old one).",
        ),
    ] = False,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="Do not draw the progress bar.")] = False,
    model: o.Model = DEFAULT_MODEL,
    device: o.Device = "cpu",
    dtype: o.Dtype = None,
    attn: o.Attn = None,
    vision_tower: o.VisionTower = None,
    compat: o.Compat = None,
    cache_dir: o.CacheDir = None,
    budgets: o.Budgets = None,
    selector: o.Selector = None,
    clusters: o.Clusters = None,
    iters: o.Iters = None,
    seed: o.Seed = None,
    kmeans: o.KMeans = None,
    max_new_tokens: o.MaxNewTokens = None,
    bands: o.Bands = None,
    stretch: o.Stretch = o.DEFAULT_STRETCH,
    max_pixels: o.MaxPixels = o.DEFAULT_MAX_PIXELS,
    region: o.Region = None,
    region_crs: o.RegionCrs = None,
    region_file: o.RegionFile = None,
    zoom: o.Zoom = None,
) -> None:
    """Answer a question list over an image archive; one row per id in OUT/predictions.jsonl.

    A list row may carry `region` (and `region_crs`): that row asks about one window of its image
    (it replaces --region / --region-file for that row)."""
    from uhrbat.batch import BatchConfig, images_rows, read_input, run_batch

    trust = "untrusted" if untrusted else "local"
    if (input is None) == (images is None):
        raise ConfigError("give exactly one of --input FILE or --images DIR_OR_GLOB (with --question)")
    if images is not None and question is None:
        raise ConfigError('--images needs --question "..." (the question asked about every image)')
    if input is not None and question is not None:
        raise ConfigError("--question goes with --images; an --input list has its own question column")
    if images is not None and image_root is not None:
        raise ConfigError("--image-root goes with --input; --images paths are used as given")
    if selector == "segments":
        raise ConfigError(
            "uhrbat batch does not read segment masks; use --selector kmeans or topk "
            "(or `uhrbat ask --masks` per image)"
        )
    rows = (
        read_input(input, image_root=image_root, trust=trust)
        if input is not None
        else images_rows(images, question or "", trust=trust)
    )
    cfg = BatchConfig(
        out=out,
        model=model,
        engine=engine,
        load=o.load_kwargs(
            device=device, dtype=dtype, attn=attn, vision_tower=vision_tower, compat=compat, cache_dir=cache_dir
        ),
        selection=o.selection_kwargs(budgets, selector, clusters, iters, seed, kmeans, zoom=zoom),
        max_new_tokens=max_new_tokens or 512,
        read_opts=o.read_kwargs(bands, stretch, max_pixels, region, region_crs, region_file),
        trust=trust,
        batch_size=batch_size,
        geojson_dir=geojson_dir,
        parquet=parquet,
        progress=not no_progress,
        retry_errors=retry_errors,
        ray_address=ray_address,
        actors=actors,
        gpus_per_actor=gpus_per_actor,
        cpus_per_actor=cpus_per_actor,
        ray_local_cpus=ray_cpus,
    )
    summary = run_batch(rows, cfg)
    typer.echo(summary.line(), err=True)
    typer.echo(summary.wrote_line(), err=True)


def register(app: typer.Typer) -> None:
    app.command("batch")(batch)
