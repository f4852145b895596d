"""Gated fine-scale encoding (`encode="gated"`): which tiles of each scale can matter.

In UHR-BAT the relevance of every token at the finer scales is the base scale's attention map
upsampled, so it is known before any fine tile is encoded. `plan_tiles` turns it into the tiles
a question needs:

* `topk`: exactly the tiles that hold the `budget` most relevant tokens (the same stable order
  as `select_topk`), so gated top-k keeps the tokens full top-k keeps;
* every other selector: the most relevant tiles (by summed relevance, ties by tile index) until
  they hold at least `gate_margin x budget` tokens; grouping and selection then run among those
  tokens only.

The base scale is always complete (the scoring pass reads it). `None` means every tile.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["plan_tiles"]


def plan_tiles(
    relevance: dict[int, Tensor], budgets: dict[int, int], base_scale: int, exact_topk: bool, margin: float
) -> dict[int, Tensor | None]:
    """Tiles to use per scale.

    Args:
        relevance: scale -> `[T_s, t, t]` relevance (tile-major, row-major patches).
        budgets: scale -> tokens kept at that scale.
        base_scale: always complete.
        exact_topk: the tiles of the top-`budget` tokens (the `topk` selector).
        margin: otherwise, tiles until they hold >= `margin * budget` tokens.
    Returns:
        scale -> `[n]` int64 tile indices ascending, or None for every tile.
    """
    plan: dict[int, Tensor | None] = {}
    for s, rel in relevance.items():
        num_tiles = rel.shape[0]
        per_tile = rel[0].numel() if num_tiles else 1
        budget = budgets[s]
        if s == base_scale:
            plan[s] = None
            continue
        flat = rel.reshape(num_tiles, per_tile)
        if exact_topk:
            top = torch.sort(flat.reshape(-1), descending=True, stable=True).indices[:budget]
            tiles = torch.unique(torch.div(top, per_tile, rounding_mode="floor"))
        else:
            need = min(num_tiles, math.ceil(margin * budget / per_tile))
            order = torch.sort(flat.sum(dim=1), descending=True, stable=True).indices
            tiles = torch.sort(order[:need]).values
        plan[s] = None if tiles.numel() == num_tiles else tiles.cpu().to(torch.int64)
    return plan
