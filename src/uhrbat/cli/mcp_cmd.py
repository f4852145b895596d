"""`uhrbat mcp`: a Model Context Protocol tool server for agents (see `uhrbat.mcp`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from uhrbat.cli import options as opt
from uhrbat.errors import UhrBatError

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@opt.shared("selection", "model", "cache", "generation")
def mcp(
    allowed_path: Annotated[
        list[Path],
        typer.Option(
            "--allowed-path",
            exists=True,
            file_okay=False,
            metavar="DIR",
            help="A folder whose images open_scene may open (symlinks resolved; give it several times for several "
            "folders). Files are read with the untrusted reader: PNG, JPEG, TIFF/GeoTIFF only, no sidecars.",
        ),
    ],
    transport: Annotated[
        Literal["stdio", "http"],
        typer.Option("--transport", help="stdio (the client starts this command) or http (streamable HTTP at /mcp)."),
    ] = "stdio",
    host: Annotated[str, typer.Option("--host", help="http: interface to listen on (loopback by default).")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="http: port (0 = any free port).")] = 8000,
    max_scenes: Annotated[int, typer.Option("--max-scenes", min=1, help="Most scenes open at once.")] = 8,
    scene_ttl: Annotated[
        float, typer.Option("--scene-ttl", min=0, metavar="SECONDS", help="Close scenes unused this long (0 = never).")
    ] = 3600.0,
    stretch: opt.Stretch = opt.DEFAULT_STRETCH,
    max_pixels: opt.MaxPixels = opt.DEFAULT_MAX_PIXELS,
    *,
    opts: opt.Shared,
) -> None:
    """Serve UHR-BAT to agents as MCP tools: open_scene, ask, look, describe_scene, close_scene.

    The model loads in the background once the server is up; questions wait for it. Register
    `uhrbat mcp --allowed-path DIR --model ...` as a stdio server in an MCP client, or run
    `--transport http` and point the client at http://HOST:PORT/mcp.
    """
    if opts.selector == "segments":
        raise typer.BadParameter(
            "segments needs a mask file per image, which MCP tool calls cannot pass; use kmeans or topk",
            param_hint="'--selector'",
        )
    try:
        from uhrbat.mcp.server import bind, build_server, http_url, run_http, run_stdio
    except ImportError as e:  # the mcp SDK missing
        raise UhrBatError(f"uhrbat mcp needs the mcp extra ({e}); pip install 'uhrbat[mcp]'") from e
    from uhrbat.cli.ask import load_pipeline
    from uhrbat.mcp.service import PipelineLoader, SceneService, ServiceOptions

    selection, load = opts.selection, opts.load  # `load` checks the device now
    options = ServiceOptions(
        allowed_paths=[str(p) for p in allowed_path],
        read=opt.read_kwargs(None, stretch, max_pixels),
        max_new_tokens=opts.max_new_tokens,
        max_scenes=max_scenes,
        scene_ttl_s=scene_ttl,
    )
    pipeline = PipelineLoader(lambda: load_pipeline(opts.model, load, selection)[0])
    service = SceneService(pipeline, options)
    server = build_server(service)
    sock = bind(host, port) if transport == "http" else None  # a taken port fails before the model loads
    pipeline.start()
    if sock is None:
        typer.echo(f"UHR-BAT MCP server on stdio; allowed folders: {', '.join(service.roots)}", err=True)
        run_stdio(server)
        return
    if host not in LOOPBACK:
        typer.echo(
            f"warning: listening on {host} without authentication: anyone who can reach it can read the images "
            "under --allowed-path and run the model",
            err=True,
        )
    typer.echo(f"UHR-BAT MCP server (streamable HTTP) on {http_url(sock)}  (Ctrl+C to stop)", err=True)
    run_http(server, sock, host)


def register(app: typer.Typer) -> None:
    app.command("mcp")(mcp)
