"""`Scene`: one image's question-independent state as seen by one model.

A scene holds, per pyramid scale, the selection embeddings of the tiles encoded so far (every
tile with `encode="full"`; with `encode="gated"` the base scale and the tiles questions needed)
and the base scale's scoring tokens. It grows: `merge` adds tiles (never one twice). `tensors()`
/ `from_tensors()` are its store item.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from uhrbat.configuration.geometry import TokenGeometry
from uhrbat.selectors.base import ScaleTokens

__all__ = ["ScaleFeatures", "Scene", "SceneGeometry"]


@dataclass(frozen=True)
class SceneGeometry:
    """The pyramid of one model: scales (ascending), the scored base scale, tile and patch sides."""

    scales: tuple[int, ...]
    base_scale: int
    tokens: TokenGeometry

    @classmethod
    def of(cls, config: Any) -> SceneGeometry:
        return cls(tuple(config.scales), int(config.base_scale), config.geometry)

    def num_tiles(self, scale: int) -> int:
        return self.tokens.grid(scale) ** 2

    def all_tiles(self, scale: int, device: Any = None) -> Tensor:
        return torch.arange(self.num_tiles(scale), device=device)


@dataclass
class ScaleFeatures:
    """The encoded tiles of one scale: `tiles` `[n]` int64 ascending, `embeds` `[n, t*t, H]`."""

    tiles: Tensor
    embeds: Tensor


@dataclass
class Scene:
    """Question-independent tensors of one image.

    Attributes:
        geometry: the model's pyramid.
        features: scale -> `ScaleFeatures` (selection embeddings: projector output, plus the scale
            residual twice when `config.enable_scale_pos_residual`).
        score_base: `[N_base, H]` base-scale tokens + the residual once (the scoring pass's image).
        clip: scale -> `[n, t*t, C]` CLIP features of the same tiles (training only).
        traced: scale -> `[n, t*t, H]` projector output + residual once (tracing only).
        groupings: grouping key -> per-scale labels computed for this scene (bounded memo).
    """

    geometry: SceneGeometry
    features: dict[int, ScaleFeatures]
    score_base: Tensor
    clip: dict[int, Tensor] | None = None
    traced: dict[int, Tensor] | None = None
    groupings: OrderedDict = field(default_factory=OrderedDict, repr=False)

    MAX_GROUPINGS = 8

    # ------------------------------------------------------------------ tiles
    def encoded(self, scale: int) -> Tensor:
        """`[n]` tile indices of `scale` encoded so far (ascending)."""
        f = self.features.get(scale)
        return f.tiles if f is not None else torch.empty(0, dtype=torch.int64)

    def complete(self, scale: int | None = None) -> bool:
        """Every tile of `scale` (of every scale if None) is encoded."""
        scales = self.geometry.scales if scale is None else (scale,)
        return all(int(self.encoded(s).numel()) == self.geometry.num_tiles(s) for s in scales)

    def missing(self, scale: int, tiles: Tensor | None = None) -> Tensor:
        """Tiles of `tiles` (all of the scale if None) not encoded yet, ascending."""
        want = self.geometry.all_tiles(scale) if tiles is None else tiles.cpu()
        have = self.encoded(scale).cpu()
        return want[~torch.isin(want, have)] if have.numel() else want

    def tile_counts(self) -> dict[int, int]:
        return {s: int(self.encoded(s).numel()) for s in self.geometry.scales}

    def merge(self, new: dict[int, ScaleFeatures]) -> Scene:
        """A scene that also holds the tiles of `new` (which must not be encoded already)."""
        features = dict(self.features)
        for s, add in new.items():
            old = features.get(s)
            if old is None:
                features[s] = add
                continue
            if torch.isin(add.tiles.cpu(), old.tiles.cpu()).any():
                raise ValueError(f"scale {s}: a tile would be encoded twice")
            tiles = torch.cat([old.tiles, add.tiles.to(old.tiles.device)])
            order = torch.sort(tiles).indices
            embeds = torch.cat([old.embeds, add.embeds.to(old.embeds.device)])[order.to(old.embeds.device)]
            features[s] = ScaleFeatures(tiles[order], embeds)
        return Scene(self.geometry, features, self.score_base, groupings=self.groupings)

    def tokens(self, scale: int, tiles: Tensor | None = None) -> ScaleTokens:
        """The candidates of `scale`: every encoded tile, or the (encoded) `tiles` given."""
        f = self.features.get(scale)
        if f is None:  # nothing of this scale encoded (a gated question with budget 0 there)
            base = self.score_base
            f = ScaleFeatures(
                torch.empty(0, dtype=torch.int64),
                base.new_empty(0, self.geometry.tokens.tokens_per_tile, base.shape[-1]),
            )
        hidden = f.embeds.shape[-1]
        if tiles is None or (tiles.numel() == f.tiles.numel() and torch.equal(tiles.cpu(), f.tiles.cpu())):
            return ScaleTokens(
                scale, f.embeds.reshape(-1, hidden), f.tiles, self.geometry.num_tiles(scale), self.geometry.tokens
            )
        rows = torch.searchsorted(f.tiles.cpu(), tiles.cpu())
        if rows.numel() and (int(rows.max()) >= f.tiles.numel() or not torch.equal(f.tiles.cpu()[rows], tiles.cpu())):
            raise ValueError(f"scale {scale}: tiles requested that are not encoded")
        embeds = f.embeds[rows.to(f.embeds.device)].reshape(-1, hidden)
        return ScaleTokens(
            scale, embeds, tiles.to(f.tiles.device), self.geometry.num_tiles(scale), self.geometry.tokens
        )

    # ------------------------------------------------------------------ groupings memo
    def grouping(self, key: Any) -> dict[int, Tensor] | None:
        got = self.groupings.get(key)
        if got is not None:
            self.groupings.move_to_end(key)
        return got

    def remember_grouping(self, key: Any, labels: dict[int, Tensor]) -> None:
        self.groupings[key] = labels
        while len(self.groupings) > self.MAX_GROUPINGS:
            self.groupings.popitem(last=False)

    # ------------------------------------------------------------------ store item
    def tensors(self) -> dict[str, Tensor]:
        out = {"score_base": self.score_base}
        for s, f in self.features.items():
            out[f"tiles.{s}"] = f.tiles
            out[f"embeds.{s}"] = f.embeds
        return out

    @property
    def dtype(self) -> torch.dtype:
        return self.score_base.dtype

    @classmethod
    def from_tensors(cls, item: dict[str, Tensor], geometry: SceneGeometry, dtype: torch.dtype) -> Scene | None:
        """Inverse of `tensors()`, or None when the item does not fit `geometry` / `dtype` (a
        foreign or stale item is recomputed, never used)."""
        base = item.get("score_base")
        if base is None or base.dim() != 2 or base.dtype != dtype:
            return None
        hidden, per_tile = base.shape[1], geometry.tokens.tokens_per_tile
        features = {}
        for s in geometry.scales:
            tiles, embeds = item.get(f"tiles.{s}"), item.get(f"embeds.{s}")
            if tiles is None and embeds is None and s != geometry.base_scale:
                continue
            if tiles is None or embeds is None or tiles.dtype != torch.int64 or tiles.dim() != 1:
                return None
            if embeds.dtype != dtype or tuple(embeds.shape) != (tiles.numel(), per_tile, hidden):
                return None
            t = tiles.cpu()
            n = geometry.num_tiles(s)
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= n or not bool((t[1:] > t[:-1]).all())):
                return None
            features[s] = ScaleFeatures(tiles, embeds)
        if len(item) != 1 + 2 * len(features):
            return None
        scene = cls(geometry, features, base)
        if (
            not scene.complete(geometry.base_scale)
            or base.shape[0] != geometry.num_tiles(geometry.base_scale) * per_tile
        ):
            return None
        return scene
