"""`uhrbat demo`: serve the local web demo (upload, question, budgets -> answer + overlay).

The page runs on the same app as `uhrbat serve` (one queue, one model, one error format), so
the OpenAI endpoints are available on the demo's port too."""

from __future__ import annotations

from typing import Annotated

import typer

from uhrbat.cli import options as opt
from uhrbat.errors import UhrBatError
from uhrbat.modeling.hub import DEFAULT_MODEL


def demo(
    model: opt.Model = DEFAULT_MODEL,
    budgets: opt.Budgets = None,
    selector: opt.Selector = None,
    clusters: opt.Clusters = None,
    iters: opt.Iters = None,
    seed: opt.Seed = None,
    kmeans: opt.KMeans = None,
    compat: opt.Compat = None,
    device: opt.Device = "cpu",
    dtype: opt.Dtype = None,
    attn: opt.Attn = None,
    vision_tower: opt.VisionTower = None,
    cache_dir: opt.CacheDir = None,
    host: Annotated[str, typer.Option("--host", help="Interface to listen on (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535)] = 7860,
    max_new_tokens: opt.MaxNewTokens = 64,
    max_upload_mb: Annotated[float, typer.Option("--max-upload-mb", min=0.001, help="Refuse bigger uploads.")] = 1024,
    max_pixels: opt.MaxPixels = opt.DEFAULT_MAX_PIXELS,
    overlay_side: Annotated[
        int, typer.Option("--overlay-side", min=64, help="Long side of the overlay's image view (px).")
    ] = 1200,
) -> None:
    """Serve a local web page to upload an image, ask a question and see the answer with the overlay."""
    try:
        from uhrbat.serving.demo import create_app, serve
    except ImportError as e:  # fastapi / uvicorn / python-multipart / prometheus_client missing
        raise UhrBatError(f"the demo needs the serve extra ({e}); pip install 'uhrbat[serve]'") from e
    from uhrbat.cli.ask import load_pipeline

    selection = opt.selection_kwargs(budgets, selector, clusters, iters, seed, kmeans)
    pipe, seconds = load_pipeline(
        model, opt.load_kwargs(device, dtype, attn, vision_tower, compat, cache_dir), selection
    )
    typer.echo(f"model loaded in {seconds:.1f}s", err=True)
    app = create_app(
        pipe,
        model_name=model,
        default_budgets=budgets,
        max_new_tokens=max_new_tokens,
        max_upload_mb=max_upload_mb,
        max_pixels=max_pixels,
        overlay_max_side=overlay_side,
    )
    if host not in ("127.0.0.1", "localhost", "::1"):
        typer.echo(
            f"warning: the demo on {host} has no authentication; anyone who can reach it can run the model", err=True
        )
    typer.echo(f"UHR-BAT demo on http://{host}:{port}/  (Ctrl+C to stop)", err=True)
    serve(app, host=host, port=port)


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
