"""`uhrbat demo`: serve the local web demo (upload, question, budgets -> answer + overlay).

The page runs on the same app as `uhrbat serve` (one engine, one model, one error format), so
the OpenAI endpoints are available on the demo's port too."""

from __future__ import annotations

from typing import Annotated

import typer

from uhrbat.cli import options as opt
from uhrbat.cli.serve_cmd import (
    SERVER_MAX_PIXELS,
    DecodeWorkers,
    MaxKMeansWork,
    MaxPixels,
    RequestTimeout,
    start_service,
)
from uhrbat.errors import UhrBatError


@opt.shared("selection", "model", "cache")
def demo(
    host: Annotated[str, typer.Option("--host", help="Interface to listen on (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535)] = 7860,
    max_new_tokens: opt.MaxNewTokens = 64,
    max_upload_mb: Annotated[float, typer.Option("--max-upload-mb", min=0.001, help="Refuse bigger uploads.")] = 128,
    max_pixels: MaxPixels = SERVER_MAX_PIXELS,
    max_kmeans_work: MaxKMeansWork = None,
    request_timeout: RequestTimeout = 120,
    decode_workers: DecodeWorkers = 2,
    overlay_side: Annotated[
        int, typer.Option("--overlay-side", min=64, help="Long side of the overlay's image view (px).")
    ] = 1200,
    *,
    opts: opt.Shared,
) -> None:
    """Serve a local web page to upload an image, ask a question and see the answer with the overlay."""
    try:
        from uhrbat.serving.demo import create_app, demo_options
        from uhrbat.serving.http_server import serve
    except ImportError as e:  # fastapi / uvicorn / python-multipart / prometheus_client missing
        raise UhrBatError(f"the demo needs the serve extra ({e}); pip install 'uhrbat[serve]'") from e

    model = opts.model
    options = demo_options(
        model,
        max_upload_mb=max_upload_mb,
        max_pixels=max_pixels,
        max_kmeans_work=max_kmeans_work,
        request_timeout_s=request_timeout or None,
        decode_workers=decode_workers,
    )
    service = start_service(opts, options)
    app = create_app(
        service,
        default_budgets=opts.selection.get("budgets"),
        default_max_new_tokens=max_new_tokens,
        overlay_max_side=overlay_side,
    )
    if host not in ("127.0.0.1", "localhost", "::1"):
        typer.echo(
            f"warning: the demo on {host} has no authentication; anyone who can reach it can run the model", err=True
        )
    typer.echo(f"UHR-BAT demo on http://{host}:{port}/  (Ctrl+C to stop)", err=True)
    serve(app, options, host=host, port=port)


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
