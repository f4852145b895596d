"""`uhrbat serve`: an OpenAI-compatible chat-completions server (see `uhrbat.serving`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from uhrbat.cli import options as opt
from uhrbat.errors import UhrBatError

LOOPBACK = ("127.0.0.1", "localhost", "::1")
SERVER_MAX_PIXELS = 16_000 * 16_000  # == uhrbat.serving.limits.SERVER_MAX_PIXELS (checked in tests)

# Server limits, shared by `serve` and `demo` (defaults: `uhrbat.serving.limits.ServeOptions`).
MaxPixels = Annotated[
    int,
    typer.Option(
        "--max-pixels",
        min=0,
        help="Refuse images with more full-resolution pixels (0 = no limit); decoding costs ~20 ns per pixel.",
    ),
]
RequestTimeout = Annotated[
    float,
    typer.Option(
        "--request-timeout",
        min=0,
        help="Seconds a request may take once its body has arrived; later it fails with 504 (0 = no limit).",
    ),
]
DecodeWorkers = Annotated[
    int,
    typer.Option(
        "--decode-workers",
        min=1,
        help="Images decoded at once, off the model's thread (each decode holds up to ~1.5 GB at the pixel limit).",
    ),
]
MaxKMeansWork = Annotated[
    int | None,
    typer.Option(
        "--max-kmeans-work",
        min=1,
        help="Most K-Means work (clusters x tokens x iterations, summed over scales) a request may ask for.  "
        "[default: what the model's own default settings cost]",
    ),
]


@opt.shared("selection", "model", "cache")
def serve(
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
    max_new_tokens: opt.MaxNewTokens = 512,
    max_pixels: MaxPixels = SERVER_MAX_PIXELS,
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
    max_kmeans_work: MaxKMeansWork = None,
    request_timeout: RequestTimeout = 120,
    decode_workers: DecodeWorkers = 2,
    batch_wait_ms: Annotated[
        float,
        typer.Option("--batch-wait-ms", min=0, help="How long the worker waits for more requests to fill a batch."),
    ] = 20,
    max_request_mb: Annotated[
        float,
        typer.Option(
            "--max-request-mb", min=0.001, help="Largest request body (base64 images included); bigger ones get 413."
        ),
    ] = 128,
    max_inflight_mb: Annotated[
        float,
        typer.Option(
            "--max-inflight-mb",
            min=0.001,
            help="Request bytes being received or answered at once; beyond it new bodies get 503 + Retry-After.",
        ),
    ] = 512,
    max_connections: Annotated[
        int, typer.Option("--max-connections", min=1, help="Open connections at most; beyond it uvicorn answers 503.")
    ] = 128,
    header_timeout: Annotated[
        float,
        typer.Option("--header-timeout", min=0.1, help="Seconds a connection has to send a complete request head."),
    ] = 10,
    read_timeout: Annotated[
        float, typer.Option("--read-timeout", min=0.1, help="Seconds a request body may stall (no bytes) before 408.")
    ] = 30,
    keep_alive: Annotated[
        float, typer.Option("--keep-alive", min=1, help="Seconds an idle keep-alive connection stays open.")
    ] = 5,
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
    *,
    opts: opt.Shared,
) -> None:
    """Serve the model over the OpenAI chat-completions API (GET /v1/models, POST /v1/chat/completions,
    GET /health, GET /metrics)."""
    try:
        from uhrbat.serving import ChatService, ServeOptions, create_app
        from uhrbat.serving.http_server import serve as run
    except ImportError as e:  # fastapi / uvicorn / prometheus_client missing
        raise UhrBatError(f"uhrbat serve needs the serve extra ({e}); pip install 'uhrbat[serve]'") from e
    from uhrbat.cli.ask import load_pipeline
    from uhrbat.io import set_decode_concurrency

    if host not in LOOPBACK and not api_key:
        typer.echo(
            f"warning: listening on {host} without --api-key: anyone who can reach it can run the model", err=True
        )
    model = opts.model
    options = ServeOptions(
        model_name=served_model_name or str(model),
        api_keys=(api_key,) if api_key else (),
        allowed_local_media_path=None if allowed_local_media_path is None else str(allowed_local_media_path),
        max_batch=max_batch,
        max_queue=max_queue,
        batch_wait_s=batch_wait_ms / 1000,
        decode_workers=decode_workers,
        max_request_bytes=int(max_request_mb * 1024 * 1024),
        max_inflight_bytes=int(max_inflight_mb * 1024 * 1024),
        max_new_tokens=max_new_tokens,
        max_kmeans_clusters=max_clusters,
        max_kmeans_iters=max_iters,
        max_kmeans_work=max_kmeans_work,
        max_pixels=max_pixels,
        request_timeout_s=request_timeout or None,
        max_connections=max_connections,
        header_timeout_s=header_timeout,
        read_timeout_s=read_timeout,
        keep_alive_s=keep_alive,
    )
    selection = opts.selection
    pipe, seconds = load_pipeline(model, opts.load, selection)
    set_decode_concurrency(decode_workers)  # this process is the server: its decodes run side by side
    service = ChatService(pipe, options)
    for line in startup_banner(service, model, seconds, selection):
        typer.echo(line, err=True)
    app = create_app(service)
    shown = f"[{host}]" if ":" in host else host
    typer.echo(
        f"UHR-BAT OpenAI-compatible API on http://{shown}:{port}/v1  (model id {options.model_name!r}; Ctrl+C to stop)",
        err=True,
    )
    run(app, options, host=host, port=port)


def startup_banner(service: Any, model: str, seconds: float, selection: dict[str, Any]) -> list[str]:
    """What the server will run with, checkpoint defaults filled in (as `uhrbat ask` prints it);
    refuses a `--max-kmeans-work` below the server's own default settings."""
    from uhrbat.cli.ask import describe_selection

    pipe, options = service.engine.pipeline(), service.options
    own_work, limit = service.facts.kmeans_work({}), service.max_kmeans_work()
    if own_work > limit:
        raise UhrBatError(
            f"--max-kmeans-work {limit:,} is below the work of the server's own selection settings ({own_work:,}); "
            "raise it or choose fewer --clusters / --iters / smaller --budgets"
        )
    dtype = str(getattr(pipe.model, "dtype", "")).removeprefix("torch.")
    scales = ",".join(map(str, service.facts.scales))
    return [
        f"model loaded in {seconds:.1f}s: {model} on {pipe.device} ({dtype}), scales {scales}",
        f"selection: {describe_selection(pipe, selection)}; K-Means work {own_work:,} per request",
        *options.describe(limit),
    ]


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
