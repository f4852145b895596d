"""The `uhrbat mcp` tool server: `SceneService` as typed MCP tools on the official SDK's
`MCPServer`, over stdio or streamable HTTP.

Each tool runs its work in a worker thread (the event loop keeps answering pings and other
calls while the model runs). A `UhrBatError` (bad path, unknown scene id, bad budgets, a model
that failed to load, ...) becomes a tool error (`isError: true`) with its one line; anything else
is an internal error, logged with its traceback on stderr, and reported in one line too. The
server keeps answering either way.
"""

# No `from __future__ import annotations`: the SDK reads the tools' annotations to build their schemas.

import base64
import functools
import logging
import socket
import sys
from typing import Annotated, Any

import anyio
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import CallToolResult, ImageContent, TextContent, ToolAnnotations
from pydantic import Field, ValidationError

from uhrbat.errors import ConfigError, UhrBatError
from uhrbat.mcp.schemas import (
    AskOutput,
    Budgets,
    Closed,
    Question,
    Region,
    RegionCrs,
    SceneDescription,
    SceneId,
    SceneInfo,
    Selector,
)
from uhrbat.mcp.service import DEFAULT_MAX_REGIONS, SceneService

logger = logging.getLogger("uhrbat.mcp")

#: Where streamable HTTP is served.
HTTP_PATH = "/mcp"

INSTRUCTIONS = """\
UHR-BAT answers questions about ultra-high-resolution remote-sensing images (aerial and satellite
scenes of thousands to tens of thousands of pixels a side) under a visual-token budget.
Workflow: open_scene(path) -> an id; ask(id, question) -> the answer and where the model found
its evidence (GeoJSON in longitude/latitude for georeferenced scenes, else scene-pixel boxes); look(id) -> a
picture of where the model looked for the last question; describe_scene(id); close_scene(id)
when done. The first question on a scene prepares it (slow); follow-up questions are much faster.
"""


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("uhrbat")
    except PackageNotFoundError:
        return "0"


async def _run(fn: Any, *args: Any) -> Any:
    """`fn(*args)` in a worker thread; errors become one-line tool errors."""
    try:
        return await anyio.to_thread.run_sync(functools.partial(fn, *args))
    except UhrBatError as e:
        raise ToolError(" ".join(str(e).split())) from None
    except Exception as e:
        logger.exception("internal error in an MCP tool")
        raise ToolError(
            f"internal error: {type(e).__name__}: {' '.join(str(e).split())} (the server's log has the traceback)"
        ) from None


class _Server(MCPServer):
    """`MCPServer` whose argument-validation errors are one line, like every other tool error."""

    async def call_tool(self, name: str, arguments: dict[str, Any], context: Any = None) -> Any:
        try:
            return await super().call_tool(name, arguments, context)
        except ToolError as e:
            if not isinstance(e.__cause__, ValidationError):
                raise
            raise ToolError(f"Error executing tool {name}: {validation_line(e.__cause__)}") from e.__cause__


def validation_line(e: ValidationError) -> str:
    """pydantic's multi-line report -> `invalid arguments: scene_id: Input should be a valid string (got 5)`."""
    parts = []
    for err in e.errors():
        where = ".".join(str(p) for p in err["loc"]) or "arguments"
        got = "" if err["type"] == "missing" else f" (got {_short(repr(err.get('input')))})"
        parts.append(f"{where}: {err['msg']}{got}")
    return "invalid arguments: " + "; ".join(parts)


def _short(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def build_server(service: SceneService) -> MCPServer:
    """An `MCPServer` with the tools open_scene, ask, look, describe_scene and close_scene."""
    server = _Server("uhrbat", instructions=INSTRUCTIONS, version=_version(), log_level="WARNING")
    roots = ", ".join(service.roots)

    @server.tool(
        description="Open an image (PNG, JPEG or TIFF/GeoTIFF) for questions; returns its id, size, CRS, bounds "
        f"and bands. Only files under the server's allowed folders can be opened: {roots}.",
        annotations=ToolAnnotations(title="Open a scene", read_only_hint=True, open_world_hint=False),
    )
    async def open_scene(
        path: Annotated[
            str,
            Field(description="The image file: absolute, or relative to an allowed folder (the first that has it)."),
        ],
        bands: Annotated[
            list[int] | None,
            Field(
                min_length=1,
                max_length=3,
                description="1-based raster bands to read as R,G,B (3) or grey (1), e.g. [4, 3, 2]. "
                "Default: the image's colour bands.",
            ),
        ] = None,
    ) -> SceneInfo:
        return await _run(service.open_scene, path, bands)

    @server.tool(
        description="Ask a question about an open scene. Returns the answer and its evidence: the visual tokens "
        "the model kept, in structured content: GeoJSON in WGS84 longitude/latitude for georeferenced scenes, "
        "else boxes in scene pixels (a pixel-space document, not GeoJSON), as coordinate_space says. The first "
        "question prepares the scene; follow-ups reuse it.",
        annotations=ToolAnnotations(title="Ask about a scene", read_only_hint=True, open_world_hint=False),
    )
    async def ask(
        scene_id: SceneId,
        question: Question,
        region: Region = None,
        region_crs: RegionCrs = None,
        budgets: Budgets = None,
        selector: Selector = None,
        max_regions: Annotated[
            int,
            Field(ge=0, description="Most evidence items returned, the most relevant first (0 = all)."),
        ] = DEFAULT_MAX_REGIONS,
    ) -> Annotated[CallToolResult, AskOutput]:
        out, summary = await _run(service.ask, scene_id, question, region, region_crs, budgets, selector, max_regions)
        return CallToolResult(
            content=[TextContent(type="text", text=summary)], structured_content=out.model_dump(mode="json")
        )

    @server.tool(
        description="A PNG of the scene (longest side <= 1024 px) with the relevance overlay of the last question "
        "asked about it: where the model looked (heatmap) and the tokens it kept (boxes per scale). Before any "
        "question: the plain image.",
        annotations=ToolAnnotations(title="Look at a scene", read_only_hint=True, open_world_hint=False),
    )
    async def look(scene_id: SceneId, region: Region = None, region_crs: RegionCrs = None) -> CallToolResult:
        png, text = await _run(service.look, scene_id, region, region_crs)
        return CallToolResult(
            content=[
                ImageContent(type="image", data=base64.b64encode(png).decode("ascii"), mime_type="image/png"),
                TextContent(type="text", text=text),
            ]
        )

    @server.tool(
        description="Size, CRS, bounds and bands of an open scene, the questions asked so far, whether it is "
        "prepared, and when it expires.",
        annotations=ToolAnnotations(title="Describe a scene", read_only_hint=True, open_world_hint=False),
    )
    async def describe_scene(scene_id: SceneId) -> SceneDescription:
        return await _run(service.describe_scene, scene_id)

    @server.tool(
        description="Close an open scene and free what it holds; its id stops working.",
        annotations=ToolAnnotations(
            title="Close a scene", read_only_hint=False, destructive_hint=True, idempotent_hint=False
        ),
    )
    async def close_scene(scene_id: SceneId) -> Closed:
        return await _run(service.close_scene, scene_id)

    return server


# ----------------------------------------------------------------------------- transports
def run_stdio(server: MCPServer) -> None:
    """Serve on stdin/stdout until the client closes stdin."""
    anyio.run(server.run_stdio_async)


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on `host:port` (port 0: any free port)."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
    except OSError as e:
        raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror or e}); choose another --host/--port") from None
    return sock


def http_url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}{HTTP_PATH}"


def run_http(server: MCPServer, sock: socket.socket, host: str) -> None:
    """Serve streamable HTTP at `HTTP_PATH` on an already bound socket until interrupted
    (SIGINT / SIGTERM). On a loopback host the SDK checks Host and Origin headers (DNS rebinding)."""
    import uvicorn

    app = server.streamable_http_app(streamable_http_path=HTTP_PATH, host=host)
    config = uvicorn.Config(app, log_level="warning", lifespan="on")
    uvicorn.Server(config).run(sockets=[sock])
    sys.stderr.flush()
