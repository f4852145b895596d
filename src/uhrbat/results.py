"""Plain result records returned by the high-level API (`uhrbat.pipeline`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from uhrbat.configuration.geometry import CLIP_336_14, TokenGeometry


@dataclass
class KeptToken:
    """One visual token the LLM saw.

    `tile` is the row-major tile index at `scale`, (`row`, `col`) the `patch_size`-px patch inside
    that `tile_size`-px tile (14 and 336 for CLIP ViT-L/14-336). For a merged token these describe
    its first member; `members` lists every member as flat positions
    (tile * tokens_per_tile + row * tokens_per_side + col, i.e. tile * 576 + row * 24 + col for
    336 / 14) at that scale. `tile_size` / `patch_size` come from the model config, so boxes
    (`uhrbat.io.geo`, overlays) are right for any vision tower.
    """

    scale: int
    tile: int
    row: int
    col: int
    score: float
    merged: bool
    group: int
    members: list[int] = field(default_factory=list)
    tile_size: int = CLIP_336_14.tile_size
    patch_size: int = CLIP_336_14.patch_size

    @property
    def geometry(self) -> TokenGeometry:
        return TokenGeometry(self.tile_size, self.patch_size)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class AskResult:
    """The answer to one question about one image, with what the model kept and timings.

    `timings` holds float seconds per stage for *this* sample: load, tiles, encode, score,
    select, prefill, decode (a batch's prefill and decoding are shared equally by its rows;
    load/tiles/encode are 0 when the scene was reused). `image_size` is the original
    (width, height); `relevance` (optional) maps scale -> `[tiles, 24, 24]` float tensor.
    `cache` says where the scene's features came from: "off" (no scene cache), "miss"
    (computed now), "hit" (memory, or prepared earlier in the same call), "disk"; `reuse` says it
    per stage: `{"features": ..., "groups": ...}` (groups only for selectors with a grouping
    step, e.g. K-Means: "miss" when it ran for this question although the features were reused).
    `tiles` maps scale -> `{"encoded": tiles encoded for this question, "held": tiles the scene
    holds now, "total": tiles of the scale}` (with `encode="gated"` "held" can be below "total").
    `prompt_tokens` counts the prompt the LLM read (visual tokens included),
    `completion_tokens` the generated tokens (end-of-sequence included when emitted).

    For a window of a larger scene (a region, or the window zoom answered from), `region` is its
    place in the scene (`uhrbat.io.regions.Region.to_dict()`: `pixels` of the full image,
    `bounds_crs`, the request) and `window_source` the window's image source: tokens index the
    window's pyramid (`image_size` is the window's), and `uhrbat.io.geo` / `uhrbat.io.overlay`
    given `window_source` place them in the scene's pixels and map coordinates. Both are None
    for a whole image. `zoom` (`ZoomResult`) holds pass 1 and every window's answer when the
    question zoomed; `timings` then sum both passes.
    """

    answer: str
    tokens: list[KeptToken]
    timings: dict[str, float]
    num_visual_tokens: int
    image_size: tuple[int, int]
    scales: list[int]
    generated_ids: list[int] = field(default_factory=list)
    relevance: dict[int, Any] | None = None
    timings_detail: dict[str, float] = field(default_factory=dict)  # sub-stages, e.g. "group" (K-Means) within "select"
    cache: str = "off"
    reuse: dict[str, str] = field(default_factory=dict)
    tiles: dict[int, dict[str, int]] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    region: dict[str, Any] | None = None
    window_source: Any = field(default=None, repr=False, compare=False)
    zoom: ZoomResult | None = field(default=None, repr=False)

    def to_dict(self, with_tokens: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "answer": self.answer,
            "num_visual_tokens": self.num_visual_tokens,
            "image_size": list(self.image_size),
            "scales": list(self.scales),
            "timings": dict(self.timings),
            "cache": self.cache,
            "reuse": dict(self.reuse),
            "tiles": {str(s): dict(v) for s, v in self.tiles.items()},
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
        }
        if self.region is not None:
            out["region"] = self.region
        if self.zoom is not None:
            out["windows"] = [w.to_dict(with_tokens, i == self.zoom.chosen) for i, w in enumerate(self.zoom.windows)]
            out["zoom"] = self.zoom.to_dict(with_tokens)
        if with_tokens:
            out["tokens"] = [t.to_dict() for t in self.tokens]
        return out


@dataclass
class ZoomWindow:
    """One window zoom looked at: `pixels` `[x0, y0, x1, y1]` of the full image, `bounds` in the
    scene's CRS (None without georeference), `score` (its area's share of pass 1's relevance
    mass) and the answer about it."""

    pixels: tuple[int, int, int, int]
    score: float
    result: AskResult
    bounds: list[float] | None = None

    def to_dict(self, with_tokens: bool = True, chosen: bool = False) -> dict[str, Any]:
        r = self.result
        out: dict[str, Any] = {
            "pixels": list(self.pixels),
            "bounds": self.bounds,
            "score": self.score,
            "chosen": chosen,
            "answer": r.answer,
            "num_visual_tokens": r.num_visual_tokens,
            "image_size": list(r.image_size),
            "timings": dict(r.timings),
            "cache": r.cache,
            "reuse": dict(r.reuse),
        }
        if with_tokens:
            out["tokens"] = [t.to_dict() for t in r.tokens]
        return out


@dataclass
class ZoomResult:
    """Both passes of a zoom question (`uhrbat.zoom`): `scene` is pass 1 (the whole scene or the
    region asked about), `windows` the windows pass 1 proposed, best first, `chosen` the index of
    the one answered from (None: no window, the answer is pass 1's), `note` why fewer windows
    than asked were found."""

    scene: AskResult
    windows: list[ZoomWindow]
    chosen: int | None
    asked: int
    note: str | None = None

    def to_dict(self, with_tokens: bool = True) -> dict[str, Any]:
        scene = self.scene
        out: dict[str, Any] = {
            "asked": self.asked,
            "chosen": self.chosen,
            "note": self.note,
            "scene": {
                "answer": scene.answer,
                "num_visual_tokens": scene.num_visual_tokens,
                "image_size": list(scene.image_size),
                "timings": dict(scene.timings),
                "cache": scene.cache,
                "reuse": dict(scene.reuse),
            },
        }
        if scene.region is not None:
            out["scene"]["region"] = scene.region
        if with_tokens:
            out["scene"]["tokens"] = [t.to_dict() for t in scene.tokens]
        return out
