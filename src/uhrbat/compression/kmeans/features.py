"""The points K-Means clusters: normalised token embedding plus tile-local (x, y) (step 8)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from uhrbat.compression.precision import autocast_off

__all__ = ["clustering_features", "tile_coordinates"]


def tile_coordinates(tokens_per_side: int = 24, device: torch.device | str | None = None) -> Tensor:
    """`[t*t, 2]` float32 tile-local token coordinates in [0, 1], row-major token order.

    Column 0 is the token's column / (t - 1), column 1 its row / (t - 1): the reference's
    `(x, y)`. Checked bitwise against the coordinate columns of the fixture's
    `kmeans.*.centers_iter1` (swapping them leaves distances and labels unchanged, not centres).
    """
    if tokens_per_side < 1:
        raise ValueError(f"tokens_per_side must be >= 1, got {tokens_per_side}")
    grid = torch.arange(tokens_per_side, device=device)
    rows, cols = torch.meshgrid(grid, grid, indexing="ij")
    # int64 / int -> float32 true division: the same rounding as the reference's `/ 23`.
    coords = torch.stack([cols, rows], dim=-1).reshape(-1, 2) / max(tokens_per_side - 1, 1)
    return coords.to(torch.float32)


@autocast_off
def clustering_features(
    embeds: Tensor,
    num_tiles: int,
    feat_scale: float = 1.0,
    coord_scale: float = 0.05,
    tokens_per_side: int = 24,
) -> Tensor:
    """Features K-Means clusters on: normalised embedding plus tile-local (x, y).

    Args:
        embeds: `[N, D]` token embeddings, tile-major then row-major, N = num_tiles * t².
        num_tiles: number of tiles T at this scale.
        feat_scale: weight of the L2-normalised embedding.
        coord_scale: weight of the coordinates (both in [0, 1] before scaling).
        tokens_per_side: t, tokens per tile side (24 for CLIP-336/14).

    Returns:
        `[N, D + 2]` float32 `cat([feat_scale * normalize(embeds), coord_scale * coords])`.
        Bitwise equal to the reference for float32 input. (The reference normalises in the
        embedding dtype, e.g. bf16 on GPU; this normalises in float32, which is more accurate.)
    """
    if embeds.dim() != 2:
        raise ValueError(f"embeds must be [N, D], got shape {tuple(embeds.shape)}")
    per_tile = tokens_per_side * tokens_per_side
    if num_tiles < 1 or embeds.shape[0] != num_tiles * per_tile:
        raise ValueError(
            f"embeds has {embeds.shape[0]} rows, expected num_tiles * {per_tile} = {num_tiles} * {per_tile}"
        )
    feats = feat_scale * F.normalize(embeds.float(), dim=1)
    coords = coord_scale * tile_coordinates(tokens_per_side, embeds.device).repeat(num_tiles, 1)
    return torch.cat([feats, coords], dim=1)
