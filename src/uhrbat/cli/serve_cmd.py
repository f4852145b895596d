"""`uhrbat serve`: an OpenAI-compatible chat-completions server (see `uhrbat.serving`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from uhrbat.cli import options as opt
from uhrbat.errors import UhrBatError

DEFAULT_MAX_SCENE_MB = 4096  # == uhrbat.serving.limits.DEFAULT_MAX_SCENE_MB (the serve extra may be missing here)

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
        list[str] | None,
        typer.Option(
            "--api-key",
            envvar="UHRBAT_API_KEY",
            show_envvar=True,
            help="Require 'Authorization: Bearer KEY' on /v1/* (what openai.OpenAI(api_key=KEY) sends). Repeat it "
            "for several keys: each key is a tenant with its own scene handles and scene cache.",
        ),
    ] = None,
    api_keys_file: Annotated[
        Path | None,
        typer.Option(
            "--api-keys-file",
            exists=True,
            dir_okay=False,
            metavar="FILE",
            help="More API keys, one per line ('#' comments and blank lines ignored).",
        ),
    ] = None,
    max_scenes: Annotated[
        int,
        typer.Option("--max-scenes", min=1, help="Scene handles (POST /v1/scenes) one API key may hold at once."),
    ] = 16,
    max_scene_mb: Annotated[
        float,
        typer.Option(
            "--max-scene-mb",
            min=1,
            help="Prepared features all scene handles together may keep in memory (~940 MiB per scene of the "
            "released model in bf16).",
        ),
    ] = DEFAULT_MAX_SCENE_MB,
    scene_ttl: Annotated[
        float,
        typer.Option(
            "--scene-ttl", min=0, help="Seconds a scene handle may stay unused before it is deleted (0 = never)."
        ),
    ] = 3600,
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
    scene handles at /v1/scenes, GET /health, GET /metrics)."""
    try:
        from uhrbat.serving import ServeOptions, create_app
        from uhrbat.serving.http_server import serve as run
    except ImportError as e:  # fastapi / uvicorn / prometheus_client missing
        raise UhrBatError(f"uhrbat serve needs the serve extra ({e}); pip install 'uhrbat[serve]'") from e
    keys = api_keys(api_key or [], api_keys_file)
    if host not in LOOPBACK and not keys:
        typer.echo(
            f"warning: listening on {host} without --api-key: anyone who can reach it can run the model", err=True
        )
    model = opts.model
    options = ServeOptions(
        model_name=served_model_name or str(model),
        api_keys=keys,
        max_scenes=max_scenes,
        max_scene_bytes=int(max_scene_mb * 1024 * 1024),
        scene_ttl_s=scene_ttl,
        cache_dir=opts.load.get("cache_dir"),
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
    service = start_service(opts, options)
    app = create_app(service)
    shown = f"[{host}]" if ":" in host else host
    typer.echo(
        f"UHR-BAT OpenAI-compatible API on http://{shown}:{port}/v1  (model id {options.model_name!r}; Ctrl+C to stop)",
        err=True,
    )
    run(app, options, host=host, port=port)


def api_keys(given: list[str], keys_file: Path | None) -> tuple[str, ...]:
    """`--api-key` values and the keys of `--api-keys-file` (one per line), each once."""
    keys = [k.strip() for k in given]
    if keys_file is not None:
        try:
            lines = keys_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise UhrBatError(f"--api-keys-file {str(keys_file)!r} cannot be read ({e}); give a UTF-8 text file") from e
        found = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
        if not found:
            raise UhrBatError(f"--api-keys-file {str(keys_file)!r} holds no key; put one key per line")
        keys += found
    bad = [k for k in keys if not k or any(c.isspace() for c in k)]
    if bad:
        raise UhrBatError("an API key is empty or holds whitespace; give keys without spaces, one per --api-key")
    return tuple(dict.fromkeys(keys))


def start_service(opts: opt.Shared, options: Any) -> Any:
    """Load the model and start the `ChatService` over it (`uhrbat serve` and `uhrbat demo`);
    prints the start-up banner with the settings questions will use."""
    from uhrbat.cli.ask import load_pipeline
    from uhrbat.io import set_decode_concurrency
    from uhrbat.serving import ChatService

    selection = opts.selection
    pipe, seconds = load_pipeline(opts.model, opts.load, selection)
    set_decode_concurrency(options.decode_workers)  # this process is the server: its decodes run side by side
    service = ChatService(pipe, options)
    for line in startup_banner(service, opts.model, seconds, selection):
        typer.echo(line, err=True)
    return service


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
