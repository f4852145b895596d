"""The seam between the MCP tools and the pipeline: how a scene is kept between questions, and
where a question's region goes. Nothing else in `uhrbat.mcp` calls the pipeline.

Today the pipeline has no scene object: its scene cache recognises the *same opened source
object* (`UhrBatPipeline._prepare` maps it to its prepared features), so the handle is the source
itself and a second question skips decoding, tiling, CLIP and K-Means. When the pipeline grows
`pipe.open(image) -> Scene` and `pipe.ask(scene, ...)`, `scene_handle` becomes
`return pipe.open(source)`; `ask` stays as it is. When regions land, `region_options` returns
the keywords instead of refusing, and `look` crops to the region.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from uhrbat.errors import ConfigError


def scene_handle(pipe: Any, source: Any) -> Any:
    """What `ask` passes to the pipeline for this scene; made once, at the scene's first question."""
    return source


def ask(pipe: Any, handle: Any, question: str, **kwargs: Any) -> Any:
    """One question about a scene -> `AskResult` (relevance included: `look` draws it)."""
    return pipe.ask(handle, question, return_relevance=True, **kwargs)


def settings(pipe: Any, overrides: dict[str, Any]) -> str:
    """The selection settings a question with `overrides` runs with (the server's defaults and the
    checkpoint's filled in), as `uhrbat ask` prints them."""
    from uhrbat.cli.ask import describe_selection

    return describe_selection(pipe, {**pipe.selection, **overrides})


def region_options(region: Sequence[float] | None, region_crs: str | None) -> dict[str, Any]:
    """`ask` / `look` keywords for a region of the scene; refused until the pipeline reads regions."""
    if region is None and region_crs is None:
        return {}
    raise ConfigError("region is not supported yet; ask about the whole scene (leave region and region_crs out)")
