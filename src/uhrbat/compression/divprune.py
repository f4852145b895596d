"""DivPrune token selection: max-min diversity (Alvar et al., CVPR 2025, `vbdi/divprune`).

Keeps `min(budget, N)` tokens of one scale, chosen greedily: each pick is the token whose cosine
distance to the nearest token already kept is the largest (a max-min, farthest-point walk over
the token features). Only features decide; relevance enters in two places (the uhrbat variant):

- the seed: with nothing kept, every token is infinitely far from the kept set, so the first
  pick is the most relevant token. (The paper seeds with the token farthest from its nearest
  neighbour, which needs all N^2 distances: 6.9e9 at the 4032 scale.)
- ties: tokens at the same distance go in descending relevance, then ascending position.

A zero feature vector has no direction: it is kept only after every other token (its distance
is 0, like an exact duplicate of a kept token) and constrains no other token.

Precision: float32. A token's score is the minimum of cosine distances each computed once from
the normalised features (nothing accumulates across picks). Distances below `RESOLUTION`
(2^-20, ~1e-6: float32 rounding of a cosine near 1) count as 0, so duplicates and
near-duplicates of kept tokens tie exactly and go by relevance instead of by rounding noise.

Cost: k picks (the greedy loop is inherent; each step is vectorised over the N tokens), N*D*k
multiply-adds done as `[N, D] x [D, 64]` products (`uhrbat.compression.greedy`), O(N*D) memory
(a normalised float32 copy of the features) plus O(N*64).

Merged tokens: DivPrune defines none; every row is one kept token (`merged=False`, `group=-1`).

Registration (for the selector registry): a selector with `grouping = False` (no
query-independent work to cache), `needs_masks = False`, `grouping_key(...) -> ()`,
`group(...) -> None`, and `select(tokens, relevance, budget, options, ...)` returning
`select_divprune(tokens.embeds, relevance, budget)` (positions are then candidate indices,
which the registry maps to scale positions). No option of its own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from uhrbat.compression.greedy import lazy_greedy, selector_inputs, single_rows, tie_rank
from uhrbat.compression.precision import autocast_off
from uhrbat.compression.types import Selection

__all__ = ["RESOLUTION", "select_divprune"]

RESOLUTION = 2.0**-20


@autocast_off
def select_divprune(
    features: Tensor,
    relevance: Tensor,
    budget: int,
    *,
    positions: Tensor | None = None,
) -> Selection:
    """The `min(budget, N)` tokens of a max-min diversity walk, seeded by relevance.

    Args:
        features: `[N, D]` token features (any float dtype; cosine geometry, so scale-free).
        relevance: `[N]` float relevance (seed and tie-break only).
        budget: rows to keep, int >= 0.
        positions: `[N]` int64 flat token positions (tie-break, and the returned `positions`);
            None means `arange(N)`.

    Returns:
        `Selection` of single rows in pick order: `embeds = features[kept]`,
        `positions = positions[kept]`, `scores = relevance[kept]` (float64).

    Raises:
        BudgetError: budget is not an integer >= 0.
        ValueError: shapes, dtypes or non-finite values.
    """
    k, pos = selector_inputs(features, relevance, budget, positions)
    if k == 0:
        return single_rows(features, relevance, pos, pos[:0])

    unit = F.normalize(features.float(), dim=1)
    nonzero = features.ne(0).any(dim=1)
    # Nothing kept yet: every token is infinitely far from the kept set (the seed is then the
    # first in tie order: the most relevant); a zero vector has distance 0 to everything.
    inf = torch.tensor(float("inf"), dtype=torch.float32, device=features.device)
    scores = torch.where(nonzero, inf, torch.zeros((), dtype=torch.float32, device=features.device))

    def combine(s: Tensor, dots: Tensor) -> Tensor:
        # Cosine distance to the nearest of the new kept tokens (a zero row's dots are 0: it
        # stays at 0); below the resolution, 0.
        dist = 1.0 - dots.amax(dim=1)
        return torch.minimum(s, dist.masked_fill(dist < RESOLUTION, 0.0))

    def direction(pick: int, _score: float) -> Tensor | None:
        return unit[pick] if bool(nonzero[pick]) else None

    kept = lazy_greedy(scores, unit, tie_rank(relevance, pos), k, combine, direction)
    return single_rows(features, relevance, pos, kept)
