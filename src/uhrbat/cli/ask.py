"""`uhrbat ask` and `uhrbat trace`."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

import typer

from uhrbat.modeling.loading import DEFAULT_MODEL


def _err(msg: str) -> None:
    typer.echo(msg, err=True)


class SelectionArgs:
    """Options shared by every command that runs the model."""

    @staticmethod
    def collect(budgets: Optional[str], selector: Optional[str], clusters: Optional[int], iters: Optional[int],
                seed: Optional[int], kmeans: Optional[str]) -> dict[str, Any]:
        from uhrbat.processing.processing_uhrbat import parse_budgets

        out: dict[str, Any] = {}
        if budgets is not None:
            out["budgets"] = parse_budgets(budgets, len(budgets.split(",")))
        if selector is not None:
            out["selector"] = selector
        if clusters is not None:
            out["kmeans_clusters"] = clusters
        if iters is not None:
            out["kmeans_iters"] = iters
        if seed is not None:
            out["seed"] = seed
        if kmeans is not None:
            out["kmeans_mode"] = kmeans
        return out


def _load(model: str, device: str, dtype: Optional[str], vision_tower: Optional[str], attn: Optional[str],
          compat: Optional[str], selection: dict[str, Any]):
    from uhrbat.pipeline import UhrBatPipeline

    t = time.perf_counter()
    _err(f"loading {model} on {device} ...")
    pipe = UhrBatPipeline.from_pretrained(model, device=device, dtype=dtype, vision_tower=vision_tower,
                                          attn_implementation=attn, compat=compat, **selection)
    # The budget count is checked against the model's scales by the pipeline (SelectionOptions).
    return pipe, time.perf_counter() - t


def open_source(image: Path, bands: Optional[str], stretch: Optional[str], max_pixels: int):
    """Open an image with the shared reader options (`--bands`, `--stretch`, `--max-pixels`)."""
    from uhrbat.errors import ImageLoadError
    from uhrbat.io.images import open_image

    try:
        band_list = tuple(int(b) for b in bands.split(",")) if bands else None
        pct = tuple(float(x) for x in stretch.split(",")) if stretch else (2.0, 98.0)
    except ValueError as e:
        raise ImageLoadError(f"bad --bands {bands!r} or --stretch {stretch!r}: {e}") from None
    return open_image(image, bands=band_list, stretch=pct, max_pixels=None if max_pixels == 0 else max_pixels)


def _masks(path: Optional[Path]) -> Optional[dict]:
    if path is None:
        return None
    from uhrbat.compression.segments import load_mask_file

    return load_mask_file(path)


def ask(
    image: Path = typer.Argument(..., help="Image file (PNG/JPEG/TIFF/GeoTIFF ...)."),
    question: str = typer.Argument(..., help="The question about the image."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="Checkpoint folder or hub id."),
    budgets: Optional[str] = typer.Option(None, "--budgets", help="Visual tokens per scale, e.g. 80,320,600,2000."),
    selector: Optional[str] = typer.Option(None, "--selector", help="kmeans | segments | topk."),
    clusters: Optional[int] = typer.Option(None, "--clusters", help="K-Means clusters per scale (0 = the budget)."),
    iters: Optional[int] = typer.Option(None, "--iters", help="Maximum K-Means iterations."),
    seed: Optional[int] = typer.Option(None, "--seed", help="K-Means initialisation seed."),
    kmeans: Optional[str] = typer.Option(None, "--kmeans", help="fast (default) | exact (reference loop order)."),
    masks: Optional[Path] = typer.Option(None, "--masks", help="Segment-id mask file for --selector segments."),
    compat: Optional[str] = typer.Option(None, "--compat", help="none | reference (reproduce the reference's eval bugs)."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1 ..."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="fp32 | bf16 | fp16 (default: checkpoint's)."),
    attn: Optional[str] = typer.Option(None, "--attn", help="LLM attention: sdpa | eager | flash_attention_2."),
    vision_tower: Optional[str] = typer.Option(None, "--vision-tower", help="CLIP folder for reference checkpoints without one."),
    max_new_tokens: int = typer.Option(512, "--max-new-tokens"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (answer, kept tokens, timings)."),
    geojson: Optional[Path] = typer.Option(None, "--geojson", help="Write the kept tokens as GeoJSON."),
    explain: Optional[Path] = typer.Option(None, "--explain", help="Write an overlay PNG of relevance and kept tokens."),
    bands: Optional[str] = typer.Option(None, "--bands", help="Raster bands to use as R,G,B (1-based), e.g. 4,3,2."),
    stretch: str = typer.Option("2,98", "--stretch", help="Percentiles for 16-bit/float to 8-bit stretching."),
    max_pixels: int = typer.Option(1_500_000_000, "--max-pixels", help="Refuse images with more pixels (0 = no limit)."),
) -> None:
    """Ask a question about a (huge) image; the answer goes to stdout."""
    selection = SelectionArgs.collect(budgets, selector, clusters, iters, seed, kmeans)
    t0 = time.perf_counter()
    source = open_source(image, bands, stretch, max_pixels)
    t_img = time.perf_counter() - t0
    pipe, t_load = _load(model, device, dtype, vision_tower, attn, compat, selection)
    res = pipe.ask(source, question, max_new_tokens=max_new_tokens, masks=_masks(masks),
                   return_relevance=explain is not None)
    res.timings["load"] = t_load + t_img + res.timings.get("load", 0.0)
    _err("  ".join(f"{k} {v:.2f}s" for k, v in res.timings.items()))
    if geojson is not None:
        from uhrbat.io import geo

        geo.write_geojson(geojson, res.tokens, source)
        _err(f"wrote {geojson}")
    if explain is not None:
        from uhrbat.io import overlay

        overlay.render_overlay(source, res.tokens, res.relevance, question, res.answer, explain)
        _err(f"wrote {explain}")
    if as_json:
        payload = res.to_dict()
        try:
            from uhrbat.io import geo

            for tok, box in zip(payload["tokens"], geo.token_pixel_boxes(res.tokens, source.size)):
                tok["pixel_box"] = box
        except (ImportError, AttributeError):
            pass
        typer.echo(json.dumps(payload))
    else:
        typer.echo(res.answer)


def trace(
    image: Path = typer.Option(..., "--image", help="Image file."),
    question: str = typer.Option(..., "--question"),
    out: Path = typer.Option(..., "--out", help="Output .safetensors file."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m"),
    budgets: Optional[str] = typer.Option(None, "--budgets"),
    selector: Optional[str] = typer.Option(None, "--selector"),
    clusters: Optional[int] = typer.Option(None, "--clusters"),
    iters: Optional[int] = typer.Option(None, "--iters"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    kmeans: Optional[str] = typer.Option(None, "--kmeans", help="fast | exact."),
    compat: Optional[str] = typer.Option(None, "--compat", help="none | reference."),
    device: str = typer.Option("cpu", "--device"),
    dtype: Optional[str] = typer.Option(None, "--dtype"),
    attn: Optional[str] = typer.Option("eager", "--attn", help="LLM attention (eager matches the fixtures bitwise)."),
    vision_tower: Optional[str] = typer.Option(None, "--vision-tower"),
    max_new_tokens: int = typer.Option(8, "--max-new-tokens"),
) -> None:
    """Write the intermediates of one query (parity-fixture tensor names) to a safetensors file."""
    from safetensors.torch import save_file

    from uhrbat.tracing import trace_query

    selection = SelectionArgs.collect(budgets, selector, clusters, iters, seed, kmeans)
    pipe, _ = _load(model, device, dtype, vision_tower, attn, compat, selection)
    tensors = trace_query(pipe, str(image), question, max_new_tokens=max_new_tokens)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out))
    ids = tensors["gen.new_token_ids"].tolist()
    _err(f"wrote {len(tensors)} tensors to {out}; new token ids {ids}")


def register(app: typer.Typer) -> None:
    app.command("ask")(ask)
    app.command("trace")(trace)
