"""Blocked lazy greedy selection: the engine shared by the DivPrune and DPP selectors.

Both selectors make k picks in sequence. Each pick takes the token with the highest score
(ties: the lowest `rank`), then lowers every token's score through the dot product of its
feature row with one new direction `w` of the pick:

- DivPrune: `score_i = min(score_i, 1 - <f_i, w>)` (cosine distance to the nearest kept token);
- DPP: `score_i = score_i - <b_i, w>**2` (the conditional variance of the kernel, Chen et al.).

Done literally, every pick reads the whole `[N, D]` feature matrix once (k matrix-vector
products, memory-bound: at N = 82,944 and D = 3,584 that is 1.2 GB per pick). Here a pick's
direction is applied at once only to a shortlist, the `pool` tokens with the highest scores, and
to every token lazily, `block` directions at a time, as one `[N, D] x [D, block]` product. Scores
only decrease, so every token outside the shortlist scores at most `bound` (the best score left
out when the shortlist was drawn); while the shortlist's best exact score is above it, that is
the exact greedy pick. Otherwise the pending directions are applied to every token and the
shortlist is drawn again (ties across its edge are decided over all tokens). The picks are the
literal greedy's; only scores within rounding of each other may be ordered differently,
because the same dot product is computed by differently blocked kernels.

The greedy loop over the k picks is inherent to both methods; every step is vectorised over the
N tokens (or the shortlist). Memory: the feature matrix, O(N) scores, an `[N, block]` product
and the `[pool, D]` shortlist rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from uhrbat.compression.selection import check_budget
from uhrbat.compression.types import Selection

__all__ = ["lazy_greedy", "selector_inputs", "single_rows", "tie_rank"]

# Directions applied to every token together; tokens whose scores are kept exact in between.
BLOCK = 64
POOL = 512
# Rows per chunk when the pending directions are applied to every token (bounds the product).
_CHUNK = 65_536


def selector_inputs(
    features: Tensor, relevance: Tensor, budget: object, positions: Tensor | None
) -> tuple[int, Tensor]:
    """Check a selector's inputs; return the rows to keep, `min(budget, N)`, and the `[N]` int64
    positions (`arange(N)` when None).

    Raises:
        BudgetError: budget is not an integer >= 0.
        ValueError: shapes, dtypes or non-finite values (one line).
    """
    budget = check_budget(budget)
    if features.dim() != 2:
        raise ValueError(f"features must be [N, D], got shape {tuple(features.shape)}")
    n = features.shape[0]
    if not features.is_floating_point():
        raise ValueError(f"features must be floating point, got {features.dtype}")
    if relevance.dim() != 1 or relevance.shape[0] != n:
        raise ValueError(f"relevance must be [N] with N = {n} (features rows), got shape {tuple(relevance.shape)}")
    if not relevance.is_floating_point():
        raise ValueError(f"relevance must be floating point, got {relevance.dtype}")
    if positions is not None:
        if positions.dim() != 1 or positions.shape[0] != n:
            raise ValueError(f"positions must be [N] with N = {n}, got shape {tuple(positions.shape)}")
        if positions.dtype.is_floating_point or positions.dtype == torch.bool:
            raise ValueError(f"positions must be an integer tensor, got {positions.dtype}")
    if n and not bool(torch.isfinite(relevance).all()):
        raise ValueError("relevance has NaN or infinite values")
    if n and not bool(torch.isfinite(features).all()):
        raise ValueError("features have NaN or infinite values")
    pos = torch.arange(n, device=features.device) if positions is None else positions.to(torch.int64)
    return min(budget, n), pos


def tie_rank(relevance: Tensor, positions: Tensor) -> Tensor:
    """`[N]` int64 rank of every token in (relevance descending, position ascending) order: the
    tie-break of both selectors (lower wins)."""
    by_pos = torch.sort(positions, stable=True).indices
    order = by_pos[torch.sort(relevance[by_pos], descending=True, stable=True).indices]
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device)
    return rank


def single_rows(features: Tensor, relevance: Tensor, positions: Tensor, kept: Tensor) -> Selection:
    """A `Selection` of the `kept` tokens as single rows, in the given order."""
    k = int(kept.numel())
    dev = features.device
    return Selection(
        embeds=features[kept],
        positions=positions[kept].to(torch.int64),
        offsets=torch.arange(k + 1, dtype=torch.int64, device=dev),
        merged=torch.zeros(k, dtype=torch.bool, device=dev),
        scores=relevance[kept].double(),
        group=torch.full((k,), -1, dtype=torch.int64, device=dev),
    )


Combine = Callable[[Tensor, Tensor], Tensor]
"""`(scores [n], products [n, m]) -> new scores [n]`: apply m directions (never increases)."""

NextDirection = Callable[[int, float], "Tensor | None"]
"""`(picked index, its exact score) -> [D] direction`, or None when the pick changes nothing."""


def lazy_greedy(
    scores: Tensor,
    features: Tensor,
    rank: Tensor,
    k: int,
    combine: Combine,
    next_direction: NextDirection,
    *,
    block: int = BLOCK,
    pool: int = POOL,
) -> Tensor:
    """k greedy picks, highest score first (ties: lowest `rank`), scores lowered after each pick.

    Args:
        scores: `[N]` float initial scores (exact). Not modified.
        features: `[N, D]` rows the directions are dotted with (same dtype as `scores`).
        rank: `[N]` int64 tie-break rank (distinct values).
        k: picks, `0 <= k <= N`.
        combine: applies directions to scores (see `Combine`); must never increase a score and
            must keep `-inf` at `-inf`.
        next_direction: the direction of a pick, called once per pick in pick order.
        block: directions applied to every token together.
        pool: size of the shortlist whose scores are kept exact between those updates.

    Returns:
        `[k]` int64 token indices in pick order.
    """
    n, d = features.shape
    picks = torch.empty(k, dtype=torch.int64, device=features.device)
    stale = scores.clone()  # exact up to the pending directions, which only lower it
    pending = features.new_empty(d, block)
    m = 0
    done = 0
    # Shortlist: the `pool` highest stale scores, kept exact; every other token's score is at
    # most `bound`, so a shortlist score above `bound` is the exact greedy pick.
    short = short_scores = short_feats = short_rank = torch.empty(0)
    bound = math.inf

    def refresh() -> None:
        nonlocal m, short, short_scores, short_feats, short_rank, bound
        if m:
            w = pending[:, :m]
            for start in range(0, n, _CHUNK):
                part = slice(start, min(start + _CHUNK, n))
                stale[part] = combine(stale[part], features[part] @ w)
            m = 0
        alive = n - done
        size = min(pool, alive)
        top = torch.topk(stale, min(size + 1, n))
        short, short_scores = top.indices[:size], top.values[:size].clone()
        short_feats, short_rank = features[short], rank[short]
        # The largest score outside the shortlist (-inf once it holds every remaining token).
        bound = float(top.values[size]) if size < alive else -math.inf

    refresh()
    for t in range(k):
        best = short_scores.max()
        if not bool(best > bound):
            refresh()
            best = short_scores.max()
        if bool(best > bound):
            tied = (short_scores == best).nonzero().squeeze(1)
            slot = tied[short_rank[tied].argmin()] if tied.numel() > 1 else tied[0]
            pick = int(short[slot])
        else:
            # Tied across the shortlist's edge (e.g. equal scores everywhere): every token
            # decides, its scores being exact right after the refresh.
            best = stale.max()
            tied = (stale == best).nonzero().squeeze(1)
            pick = int(tied[rank[tied].argmin()]) if tied.numel() > 1 else int(tied[0])
        picks[t] = pick
        done = t + 1
        stale[pick] = -math.inf
        short_scores.masked_fill_(short == pick, -math.inf)
        direction = next_direction(pick, float(best))
        if direction is not None and t + 1 < k:
            short_scores = combine(short_scores, (short_feats @ direction)[:, None])
            pending[:, m] = direction
            m += 1
            if m == block:
                refresh()
    return picks
