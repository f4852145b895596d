"""The seam between the MCP tools and the pipeline: how a scene is kept between questions, and
where a question's region goes. Nothing else in `uhrbat.mcp` calls the pipeline.

The handle of a scene is its opened source (the untrusted reader's, remembering its file:
`uhrbat.scene.origin.open_source`); the pipeline's scene store finds its prepared features
again, so a second question skips decoding, tiling, CLIP and K-Means. A region is a window of
that file, read again at native resolution with the scene's own reading options (a child scene,
exactly as the window cut into its own file); each scene keeps its last few windows
(`window`), so follow-up questions and `look` about the same region reuse them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

#: Windows (regions) kept per open scene, the least recently used dropped.
MAX_WINDOWS_PER_SCENE = 4


def scene_handle(pipe: Any, source: Any) -> Any:
    """What `ask` passes to the pipeline for this scene; made once, at the scene's first question."""
    return source


def ask(pipe: Any, handle: Any, question: str, **kwargs: Any) -> Any:
    """One question about a scene (or a window of it) -> `AskResult` (relevance included: `look` draws it)."""
    return pipe.ask(handle, question, return_relevance=True, **kwargs)


def settings(pipe: Any, overrides: dict[str, Any]) -> str:
    """The selection settings a question with `overrides` runs with (the server's defaults and the
    checkpoint's filled in), as `uhrbat ask` prints them."""
    from uhrbat.cli.ask import describe_selection

    return describe_selection(pipe, {**pipe.selection, **overrides})


def region_options(region: Sequence[float] | None, region_crs: str | None) -> Any:
    """A tool call's region, checked with the options vocabulary's rules (`RegionError`, one
    line): the parsed `uhrbat.io.regions.RegionRequest`, or None for the whole scene."""
    if region is None and region_crs is None:
        return None
    from uhrbat.options import ReadOptions

    return ReadOptions.of(region=None if region is None else list(region), region_crs=region_crs).region_request()


def window(scene: Any, request: Any) -> Any:
    """The source of the window `request` of an open scene: read from the scene's file with its
    reading options (untrusted, inside `decode_section`), or the same window kept from an earlier
    call. `RegionError` when the region does not fit the scene."""
    from uhrbat.io import decode_section

    key = repr(request.key())
    with scene.lock:
        got = scene.windows.get(key)
        if got is not None:
            scene.windows.move_to_end(key)
            return got
    with decode_section():
        source = scene.source.origin.open(request)
    with scene.lock:
        scene.windows[key] = source
        while len(scene.windows) > MAX_WINDOWS_PER_SCENE:
            scene.windows.popitem(last=False)
    return source
