"""Typed tool arguments and results of `uhrbat mcp` (pydantic: the SDK turns them into the tools'
input and output JSON schemas). Argument names follow the project's options vocabulary."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, WithJsonSchema

from uhrbat.selectors import selector_names

#: Selectors a tool call may name: `segments` needs a mask file per image, which MCP has no way to pass.
MCP_SELECTORS = tuple(s for s in selector_names() if s != "segments")

# ----------------------------------------------------------------------------- arguments
SceneId = Annotated[str, Field(description="The id open_scene returned.")]
Question = Annotated[str, Field(description="A question about the scene, in natural language.")]
# Budgets and selector are checked by the CLI's own parsers in the tool (one-line errors), so the
# schema states the rule and validation passes the value through.
Budgets = Annotated[
    Any,
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "array", "items": {"type": "integer", "minimum": 0}},
                {"type": "string", "pattern": r"^\s*\d+(\s*,\s*\d+)*\s*$"},
                {"type": "null"},
            ],
            "default": None,
            "description": "Visual tokens kept per scale, one integer >= 0 per scale (not all 0), e.g. "
            "[80, 320, 600, 2000] or '80,320,600,2000'. Default: the server's.",
        }
    ),
]
Selector = Annotated[
    Any,
    WithJsonSchema(
        {
            "anyOf": [{"type": "string", "enum": list(MCP_SELECTORS)}, {"type": "null"}],
            "default": None,
            "description": "How tokens are grouped before preserve-and-merge: kmeans (the paper's) or topk "
            "(the most relevant tokens). Default: the server's.",
        }
    ),
]
Region = Annotated[
    list[float] | None,
    Field(
        min_length=4,
        max_length=4,
        description="[x0, y0, x1, y1]: a box of the scene in pixels (x right, y down, origin at the top-left "
        "corner; x1, y1 exclusive), or in map coordinates with region_crs. The window is read at native "
        "resolution (the model sees it as if cut into its own file); evidence stays in the scene's coordinates. "
        "Default: the whole scene.",
    ),
]
RegionCrs = Annotated[
    str | None,
    Field(description="CRS of region's coordinates, e.g. 'EPSG:4326' (any CRS pyproj knows). Default: pixels."),
]


# ----------------------------------------------------------------------------- results
class SceneInfo(BaseModel):
    """What open_scene returns: the handle and what the scene is."""

    id: str = Field(description="Unguessable handle of the opened scene; pass it to ask, look, describe_scene.")
    width: int = Field(description="Width in pixels.")
    height: int = Field(description="Height in pixels.")
    crs: str | None = Field(description="Coordinate reference system, e.g. 'EPSG:32617'; null if not georeferenced.")
    bounds: list[float] | None = Field(
        description="[min_x, min_y, max_x, max_y] of the scene in its CRS; null if not georeferenced."
    )
    bands: list[int] | None = Field(
        description="1-based raster bands read as R,G,B (or one grey band); null for images decoded as their "
        "own colours (PNG, JPEG, plain TIFF)."
    )
    georeference_note: str | None = Field(
        default=None, description="Why a file that carries a georeference was read without it, if it was."
    )


class AskOutput(BaseModel):
    """The answer and its evidence: where the visual tokens the model kept lie in the scene."""

    scene_id: str
    question: str
    answer: str
    region: dict[str, Any] | None = Field(
        default=None,
        description="The window asked about: pixels [x0, y0, x1, y1] of the scene, bounds_crs in its CRS "
        "(georeferenced scenes), the request as given, and a note when it was clipped to the scene; null for the "
        "whole scene.",
    )
    coordinate_space: Literal["wgs84", "pixel"] = Field(
        description="wgs84: evidence is GeoJSON in longitude/latitude (georeferenced scene); pixel: evidence is a "
        "pixel-space document (format uhrbat.pixel-boxes/1, not GeoJSON) in scene pixels, x right, y down from "
        "the top-left corner, and its coordinate_note says why there are no map coordinates."
    )
    evidence: dict[str, Any] = Field(
        description="The kept tokens, most relevant first: a GeoJSON FeatureCollection (wgs84; each feature's "
        "properties hold score, scale, status kept|merged, box_px, box_crs) or the pixel-space document (pixel; "
        "its `tokens` list holds the same properties and rects_px)."
    )
    regions_total: int = Field(description="Visual tokens the model kept (and merged) for this answer.")
    regions_returned: int = Field(description="Features in evidence (the max_regions most relevant).")
    question_number: int = Field(description="1 for the scene's first question, 2 for the next, ...")
    cache: str = Field(
        description="Where the scene's prepared features came from: miss (prepared now), hit (reused from an "
        "earlier question), disk, off."
    )
    timings: dict[str, float] = Field(description="Seconds per stage: load, tiles, encode, score, select, ...")
    seconds: float = Field(description="Sum of timings.")
    settings: str = Field(description="The selection settings that ran (server defaults filled in).")


class QuestionRecord(BaseModel):
    question: str
    answer: str
    cache: str
    seconds: float


class SceneDescription(SceneInfo):
    """What describe_scene returns."""

    path: str = Field(description="The file the scene was opened from (symlinks resolved).")
    questions_asked: int
    questions: list[QuestionRecord] = Field(description="The questions asked so far (the last 100), oldest first.")
    prepared: bool = Field(description="Whether the first question has prepared the scene (tiles, features, groups).")
    last_cache: str | None = Field(description="The cache status of the last question, null before the first.")
    idle_seconds: float
    expires_in_seconds: float | None = Field(description="Seconds left before the unused scene expires; null: never.")


class Closed(BaseModel):
    id: str
    closed: bool = True
    questions_asked: int
