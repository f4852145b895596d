"""Query-guided relevance (method §3) as pure tensor functions (the scoring pass's maths).

The LLM itself scores the base-scale tokens: the last prompt token's last-layer attention
over the image tokens, averaged over heads. Everything here works on tensors handed in by
the model (no module state), so it can be tested and reused on its own.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from uhrbat.compression.precision import autocast_off
from uhrbat.configuration.geometry import CLIP_336_14

_SIDE = CLIP_336_14.tokens_per_side  # the released checkpoints' geometry; callers pass their config's


@autocast_off
def last_query_attention(
    q_last: torch.Tensor, keys: torch.Tensor, head_dim: int, key_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Softmax attention of one query row over all keys, per head, in float32.

    Args:
        q_last: `[H, d]` the query of the last prompt token (RoPE applied).
        keys: `[H_kv, L, d]` keys of every position (RoPE applied); KV heads are repeated to H
            with `repeat_interleave` (grouped-query attention).
        head_dim: d; scores are divided by sqrt(d) (a division, as the reference does).
        key_mask: optional `[L]` bool, False for keys to ignore (padding).

    Returns:
        `[H, L]` attention probabilities. The last row of a causal mask is all zeros, so no
        causal term is needed for the last query.
    """
    n_rep = q_last.shape[0] // keys.shape[0]
    k = keys.float().repeat_interleave(n_rep, dim=0)  # [H, L, d]
    # q @ k^T (not k @ q) so the products round exactly like the reference's score matrix row.
    scores = torch.matmul(q_last.float().unsqueeze(1), k.transpose(-1, -2)).squeeze(1) / math.sqrt(head_dim)  # [H, L]
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask.to(torch.bool), float("-inf"))
    return torch.softmax(scores, dim=-1)


@autocast_off
def image_relevance(attn: torch.Tensor, image_positions: torch.Tensor) -> torch.Tensor:
    """`[H, L]` attention -> `[N_img]` relevance (head mean at the image positions, no renormalisation)."""
    return attn[:, image_positions].mean(dim=0)


def tiles_to_grid(values: torch.Tensor, grid: int, tokens_per_side: int = _SIDE) -> torch.Tensor:
    """`[grid*grid*t*t]` tile-major values -> `[grid*t, grid*t]` map (tile (r, c) at rows t*r..)."""
    t = tokens_per_side
    return values.reshape(grid, grid, t, t).permute(0, 2, 1, 3).reshape(grid * t, grid * t)


def grid_to_tiles(grid_map: torch.Tensor, grid: int, tokens_per_side: int = _SIDE) -> torch.Tensor:
    """`[grid*t, grid*t]` map -> `[grid*grid, t, t]` row-major tiles."""
    t = tokens_per_side
    return grid_map.reshape(grid, t, grid, t).permute(0, 2, 1, 3).reshape(grid * grid, t, t)


@autocast_off
def upsample_relevance(
    base: torch.Tensor, base_grid: int, grids: list[int], tokens_per_side: int = _SIDE
) -> list[torch.Tensor]:
    """Bilinearly transfer the base-scale relevance to every scale (align_corners=False).

    Args:
        base: `[base_grid^2 * t^2]` tile-major relevance at the base scale.
        base_grid: tiles per side at the base scale (2 for 672).
        grids: tiles per side of each target scale.

    Returns:
        one `[g^2, t, t]` tensor per target scale, in `grids` order.
    """
    t = tokens_per_side
    m = tiles_to_grid(base, base_grid, t)[None, None]
    out = []
    for g in grids:
        up = m if g == base_grid else F.interpolate(m, size=(g * t, g * t), mode="bilinear", align_corners=False)
        out.append(grid_to_tiles(up[0, 0], g, t))
    return out
