"""DPP token selection: conditional DPP with relevance as quality (CDPruner, `DamonZhao-sfu/CDPruner`).

Keeps `min(budget, N)` tokens of one scale by greedy MAP inference of a determinantal point
process whose kernel weighs feature similarity by relevance:

    L = diag(q) (S + jitter * I) diag(q),   S = cosine similarity of the features,
    q_i = exp(alpha * r_i),   r = relevance min-max scaled to [0, 1],   alpha = theta / (2 (1 - theta)).

Each pick adds the token that most increases log det(L_kept) (Chen, Zhang & Zhou, "Fast greedy
MAP inference for determinantal point process", NeurIPS 2018). With this q that objective is

    log det(L_Y) = (theta / (1 - theta)) * sum_{i in Y} r_i + log det(S_Y + jitter * I)

(Chen et al.'s trade-off), so `theta` moves the selection from pure diversity (0: the most
mutually dissimilar tokens) towards pure relevance (-> 1: the top-k tokens). The default 0.5
weighs the summed relevance and the log-volume of the kept features equally, the balance
CDPruner's code suggests. Min-max scaling makes `theta` mean the same on every scale and image
whatever the attention magnitudes are; a scale with constant relevance is pure diversity.

`jitter` (default 1e-6) keeps the kernel positive definite. Without it the greedy stops making
sense after rank(S) <= D picks (every conditional variance is 0: CDPruner then stops early and
returns fewer tokens); with it, later picks follow quality, still pushed apart slightly by
similarity, and the budget is always met. It barely changes earlier picks (a conditional
variance of the kernel is then far above `jitter * q_i^2`). A zero feature vector has S_ii = 0:
it adds only the jitter, like a duplicate of a kept token.

Algorithm: Chen et al.'s incremental Cholesky update in its feature (dual) form, which the
kernel's structure allows: with b_i = q_i * unit(f_i) the kernel is B B^T + jitter * diag(q^2),
each pick j adds one orthonormal direction v_j (D-dimensional: the jitter part of v_j lies on
kept tokens only) and every token's conditional variance d_i^2 drops by <b_i, v_j>^2. The
picks equal Chen's; memory is O(N*D + k*D) instead of the O(N*k) of Chen's `cis` matrix
(1.3 GB at N = 82,944, k = 2,000). The updates run in blocks (`uhrbat.compression.greedy`).

Precision: float64. Every d_i^2 is an O(q_i^2) number from which the squared projections are
subtracted pick after pick; late picks are decided by what is left, which float32 would
bury in rounding.

Cost: k picks (the greedy loop is inherent; each step is vectorised over the N tokens), about
N*D*k multiply-adds in `[N, D] x [D, 64]` float64 products plus k^2*D/2 for the directions,
memory 8*N*D bytes (a float64 copy of the normalised, quality-weighted features) plus O(k*D).

Merged tokens: the DPP defines none; every row is one kept token (`merged=False`, `group=-1`).

Registration (for the selector registry): a selector with `grouping = False` (no
query-independent work to cache), `needs_masks = False`, `grouping_key(...) -> ()`,
`group(...) -> None`, and `select(tokens, relevance, budget, options, ...)` returning
`select_dpp(tokens.embeds, relevance, budget, theta=...)` (positions are then candidate
indices, which the registry maps to scale positions). Its option is `theta`, float in [0, 1),
default `DEFAULT_THETA`; add it to the options vocabulary as e.g. `dpp_theta` if users should
set it (`jitter` is an implementation constant).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from uhrbat.compression.greedy import lazy_greedy, selector_inputs, single_rows, tie_rank
from uhrbat.compression.precision import autocast_off
from uhrbat.compression.types import Selection
from uhrbat.errors import ConfigError

__all__ = ["DEFAULT_JITTER", "DEFAULT_THETA", "dpp_quality", "select_dpp"]

DEFAULT_THETA = 0.5
DEFAULT_JITTER = 1e-6


def _check_theta(theta: object) -> float:
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not 0.0 <= float(theta) < 1.0:
        raise ConfigError(
            f"dpp theta must be a number in [0, 1) (0 = diversity only; near 1 = relevance first), got {theta!r}; "
            "for relevance only use the topk selector"
        )
    return float(theta)


def dpp_quality(relevance: Tensor, theta: float = DEFAULT_THETA) -> Tensor:
    """`[N]` float64 quality q = exp(alpha * (r - 1)) of min-max scaled relevance r.

    The constant factor exp(-alpha) (q in (0, 1] instead of [1, e^alpha]) changes no pick and
    keeps q^2 finite for theta near 1."""
    theta = _check_theta(theta)
    r = relevance.double()
    lo, hi = r.min(), r.max()
    scaled = (r - lo) / (hi - lo) if bool(hi > lo) else torch.ones_like(r)
    alpha = theta / (2.0 * (1.0 - theta))
    return torch.exp(alpha * (scaled - 1.0))


@autocast_off
def select_dpp(
    features: Tensor,
    relevance: Tensor,
    budget: int,
    *,
    positions: Tensor | None = None,
    theta: float = DEFAULT_THETA,
    jitter: float = DEFAULT_JITTER,
) -> Selection:
    """The `min(budget, N)` tokens of greedy MAP inference of the conditional DPP above.

    Args:
        features: `[N, D]` token features (any float dtype; cosine geometry, so scale-free).
        relevance: `[N]` float relevance (quality through `theta`; tie-break).
        budget: rows to keep, int >= 0.
        positions: `[N]` int64 flat token positions (tie-break, and the returned `positions`);
            None means `arange(N)`.
        theta: relevance/diversity trade-off in [0, 1).
        jitter: > 0, added to the similarity's diagonal.

    Returns:
        `Selection` of single rows in pick order: `embeds = features[kept]`,
        `positions = positions[kept]`, `scores = relevance[kept]` (float64). Exactly tied
        gains go in descending relevance, then ascending position.

    Raises:
        BudgetError: budget is not an integer >= 0.
        ConfigError: theta or jitter out of range.
        ValueError: shapes, dtypes or non-finite values.
    """
    theta = _check_theta(theta)
    if isinstance(jitter, bool) or not isinstance(jitter, (int, float)) or not 0.0 < float(jitter) < math.inf:
        raise ConfigError(f"dpp jitter must be a finite number > 0, got {jitter!r}")
    k, pos = selector_inputs(features, relevance, budget, positions)
    if k == 0:
        return single_rows(features, relevance, pos, pos[:0])

    q = dpp_quality(relevance, theta)
    feats = F.normalize(features.double(), dim=1)  # zero rows stay 0 (S_ii = 0)
    has_dir = feats.ne(0).any(dim=1).double()
    feats.mul_(q[:, None])  # b_i = q_i * unit(f_i)
    q2 = q * q
    variance = q2 * (has_dir + jitter)  # L_ii: the first pick's gain
    dirs = feats.new_empty(k, feats.shape[1])  # orthonormal directions of the kept tokens
    made = 0

    def direction(pick: int, var: float) -> Tensor | None:
        nonlocal made
        # The kept token's conditional variance is at least its jitter part (exactly, in exact
        # arithmetic); an underflowed quality (theta near 1) gives a zero vector: no direction.
        var = max(var, float(q2[pick]) * jitter)
        if not var > 0.0:
            return None
        b = feats[pick]
        if made:
            prev = dirs[:made]
            b = b - (prev @ b) @ prev
        dirs[made] = b / math.sqrt(var)
        made += 1
        return dirs[made - 1]

    def combine(s: Tensor, dots: Tensor) -> Tensor:
        return s - torch.einsum("ij,ij->i", dots, dots)

    kept = lazy_greedy(variance, feats, tie_rank(relevance, pos), k, combine, direction)
    return single_rows(features, relevance, pos, kept)
