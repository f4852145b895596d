"""`uhrbat serve`: an OpenAI-compatible chat-completions server (see `uhrbat.serving.app`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from uhrbat.cli import options as opt
from uhrbat.errors import UhrBatError
from uhrbat.modeling.hub import DEFAULT_MODEL

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def serve(
    model: opt.Model = DEFAULT_MODEL,
    host: Annotated[str, typer.Option("--host", help="Interface to listen on (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535)] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key",
            envvar="UHRBAT_API_KEY",
            show_envvar=True,
            help="Require 'Authorization: Bearer KEY' on /v1/* (what openai.OpenAI(api_key=KEY) sends).",
        ),
    ] = None,
    served_model_name: Annotated[
        str | None, typer.Option("--served-model-name", help="The model id clients send.  [default: --model as given]")
    ] = None,
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
    max_new_tokens: opt.MaxNewTokens = 512,
    max_pixels: opt.MaxPixels = opt.DEFAULT_MAX_PIXELS,
    max_batch: Annotated[
        int,
        typer.Option(
            "--max-batch", min=1, help="Most requests run together in one model batch (1 = no micro-batching)."
        ),
    ] = 8,
    max_queue: Annotated[
        int,
        typer.Option(
            "--max-queue", min=1, help="Most requests waiting for the model; more are answered 503 + Retry-After."
        ),
    ] = 64,
    max_clusters: Annotated[
        int,
        typer.Option("--max-clusters", min=0, help="Largest kmeans_clusters a request may ask for (extra_body)."),
    ] = 3000,
    max_iters: Annotated[
        int,
        typer.Option("--max-iters", min=1, help="Largest kmeans_iters a request may ask for (extra_body)."),
    ] = 100,
    batch_wait_ms: Annotated[
        float,
        typer.Option("--batch-wait-ms", min=0, help="How long the worker waits for more requests to fill a batch."),
    ] = 20,
    max_request_mb: Annotated[
        float,
        typer.Option(
            "--max-request-mb", min=0.001, help="Largest request body (base64 images included); bigger ones get 413."
        ),
    ] = 256,
    allowed_local_media_path: Annotated[
        Path | None,
        typer.Option(
            "--allowed-local-media-path",
            exists=True,
            file_okay=False,
            metavar="DIR",
            help="Allow image_url file:// URLs of files inside DIR (symlinks resolved).  [default: file:// refused]",
        ),
    ] = None,
) -> None:
    """Serve the model over the OpenAI chat-completions API (GET /v1/models, POST /v1/chat/completions,
    GET /health, GET /metrics)."""
    try:
        from uhrbat.serving.app import ServeOptions, create_app
        from uhrbat.serving.app import serve as run
        from uhrbat.serving.engine import Engine
    except ImportError as e:  # fastapi / uvicorn / prometheus_client missing
        raise UhrBatError(f"uhrbat serve needs the serve extra ({e}); pip install 'uhrbat[serve]'") from e
    from uhrbat.cli.ask import load_pipeline

    if host not in LOOPBACK and not api_key:
        typer.echo(
            f"warning: listening on {host} without --api-key: anyone who can reach it can run the model", err=True
        )
    selection = opt.selection_kwargs(budgets, selector, clusters, iters, seed, kmeans)
    load = opt.load_kwargs(device, dtype, attn, vision_tower, compat, cache_dir)
    pipe, seconds = load_pipeline(model, load, selection)
    typer.echo(f"model loaded in {seconds:.1f}s", err=True)
    engine = Engine(pipe, max_batch=max_batch, max_queue=max_queue, batch_wait_s=batch_wait_ms / 1000)
    options = ServeOptions(
        model_name=served_model_name or str(model),
        api_key=api_key or None,
        allowed_local_media_path=None if allowed_local_media_path is None else str(allowed_local_media_path),
        max_request_bytes=int(max_request_mb * 1024 * 1024),
        max_new_tokens=max_new_tokens,
        max_kmeans_clusters=max_clusters,
        max_kmeans_iters=max_iters,
        max_pixels=max_pixels,
    )
    app = create_app(engine, options)
    shown = f"[{host}]" if ":" in host else host
    typer.echo(
        f"UHR-BAT OpenAI-compatible API on http://{shown}:{port}/v1  (model id {options.model_name!r}; Ctrl+C to stop)",
        err=True,
    )
    run(app, host=host, port=port)


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
