"""The `Selector` protocol and the tokens it works on.

A selector is a pure function of one scale's tensors - features, positions, relevance, budget
and its options - to a `Selection` (kept and merged rows). It may have a query-independent
grouping step (K-Means labels) that the scene caches: `group` computes it, `grouping_key`
names everything it depends on besides the tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor

from uhrbat.compression.types import Selection
from uhrbat.configuration.geometry import TokenGeometry
from uhrbat.errors import MaskError

if TYPE_CHECKING:
    from uhrbat.options import ResolvedSelection

__all__ = ["ScaleTokens", "Selector", "SelectorBase", "require_mask"]


@dataclass(frozen=True)
class ScaleTokens:
    """The candidate tokens of one scale: every tile, or the tiles encoded so far (gated).

    Attributes:
        scale: pyramid side in pixels.
        embeds: `[n * tokens_per_tile, D]` selection embeddings, tile-major, tiles ascending.
        tiles: `[n]` int64 tile indices at this scale, ascending.
        num_scale_tiles: tiles of the whole scale (`n` equals it when every tile is a candidate).
        geometry: tile and patch sides.
    """

    scale: int
    embeds: Tensor
    tiles: Tensor
    num_scale_tiles: int
    geometry: TokenGeometry

    @property
    def complete(self) -> bool:
        return int(self.tiles.numel()) == self.num_scale_tiles

    @property
    def num_tiles(self) -> int:
        return int(self.tiles.numel())

    def positions(self) -> Tensor:
        """`[N]` flat positions at the scale (tile * tokens_per_tile + row * side + col)."""
        per = self.geometry.tokens_per_tile
        local = torch.arange(per, device=self.tiles.device)
        return (self.tiles[:, None] * per + local[None, :]).reshape(-1)

    def to_scale(self, local: Tensor) -> Tensor:
        """Candidate indices `[M]` -> flat positions at the scale (identity when complete)."""
        if self.complete:
            return local
        per = self.geometry.tokens_per_tile
        tiles = self.tiles.to(local.device)
        return tiles[torch.div(local, per, rounding_mode="floor")] * per + local % per


class Selector(Protocol):
    """What the registry holds (`uhrbat.selectors.register_selector`).

    Attributes:
        name: the registered name.
        grouping: True when `group` does query-independent work worth caching with the scene.
        needs_masks: True when `select` needs a segment mask for every scale.
    """

    name: str
    grouping: bool
    needs_masks: bool

    def grouping_key(self, options: ResolvedSelection, config: Any) -> tuple:
        """Everything `group` depends on besides the tokens (a cache key; empty: no grouping)."""
        ...

    def group(
        self,
        tokens: ScaleTokens,
        budget: int,
        options: ResolvedSelection,
        config: Any,
        generator: torch.Generator,
        details: dict | None = None,
    ) -> Tensor | None:
        """Query-independent grouping of one scale: `[N]` int64 labels, or None. One `generator`
        runs through the scales in order; `details` (tracing) may receive `{scale: anything}`."""
        ...

    def select(
        self,
        tokens: ScaleTokens,
        relevance: Tensor,
        budget: int,
        options: ResolvedSelection,
        groups: Any = None,
        mask: Any = None,
    ) -> Selection:
        """At most `budget` rows from the candidates; positions index the candidates (`[N]`)."""
        ...


class SelectorBase:
    """Defaults for a selector without a grouping step or masks: subclass it and write `select`."""

    name = ""
    grouping = False
    needs_masks = False

    def grouping_key(self, options: Any, config: Any) -> tuple:
        return ()

    def group(
        self, tokens: ScaleTokens, budget: int, options: Any, config: Any, generator: Any, details: Any = None
    ) -> Tensor | None:
        return None

    def select(
        self, tokens: ScaleTokens, relevance: Tensor, budget: int, options: Any, groups: Any = None, mask: Any = None
    ) -> Selection:
        raise NotImplementedError


def require_mask(masks: dict | None, scale: int, selector: str = "segments") -> Any:
    """The segment mask of `scale` for a selector that `needs_masks`, or `MaskError`.

    The reference silently fell back to top-k for a scale without a mask; a different selector
    is never substituted here without being asked for."""
    mask = None if masks is None else masks.get(scale, masks.get(str(scale)))
    if mask is None:
        raise MaskError(
            f"selector {selector!r} needs a segment mask for every scale, but scale {scale} has none; "
            "pass the masks (`uhrbat masks` output, --masks FILE) or use selector 'topk'"
        )
    return mask
