"""Region-faithful preserve-and-merge token selection (method §4.1 steps 4-6, §4.2).

Tokens of one scale are split into groups (K-Means clusters or SAM segments). Groups are
visited by mean relevance, highest first; in each group the tokens whose relevance is strictly
above the group mean are kept one by one (highest first), then the remaining ("low") tokens are
averaged into one merged row. The walk stops when the budget is spent; groups never reached are
dropped.

`preserve_and_merge(..., exact=False)` (default) is vectorised: group statistics by
`index_add_`/`scatter_reduce`, group order by one stable sort, the emission sequence by one
token sort plus cumsums, merged rows (float64 means) only for the groups actually reached. It
decides every "score > group mean" test and the group order exactly as the reference does with
its float32 `mean()` values: float64 group means settle every comparison farther apart than a
rigorous bound on the rounding of a float32 `mean()` (any summation order), and only the few
*reachable* groups with a member or a neighbouring group inside that band get their float32
`mean()` computed the reference's way (a short Python loop; 0 to 5 groups on the fixtures).
Rows of exactly tied scores inside a group come in position order (stable), where the
reference follows torch's unstable CPU argsort; the set of rows is the same.

`exact=True` runs the reference's per-group loop, op for op, for bitwise reproduction
(including that tie order).
"""

from __future__ import annotations

import operator

import torch
from torch import Tensor

from uhrbat.compression.kmeans import KMeansResult, clustering_features, kmeans
from uhrbat.compression.precision import autocast_off
from uhrbat.compression.types import Selection
from uhrbat.configuration.geometry import CLIP_336_14
from uhrbat.errors import BudgetError

__all__ = [
    "check_budget",
    "cluster_tokens",
    "max_selectable",
    "preserve_and_merge",
    "select_segments",
    "select_topk",
]


def check_budget(budget: object) -> int:
    """Return `budget` as a Python int >= 0, or raise `BudgetError`.

    Accepts ints and integer scalars (numpy / 0-d torch); rejects bools, floats and negatives.
    """
    if isinstance(budget, bool):
        raise BudgetError(f"token budget must be an integer >= 0, got {budget!r}")
    try:
        value = operator.index(budget)  # type: ignore[arg-type]
    except TypeError:
        raise BudgetError(f"token budget must be an integer >= 0, got {budget!r}") from None
    if value < 0:
        raise BudgetError(f"token budget must be >= 0, got {value}")
    return value


def _check_inputs(embeds: Tensor, scores: Tensor, groups: Tensor | None = None) -> None:
    if embeds.dim() != 2:
        raise ValueError(f"embeds must be [N, D], got shape {tuple(embeds.shape)}")
    if scores.dim() != 1 or scores.shape[0] != embeds.shape[0]:
        raise ValueError(
            f"scores must be [N] with N = {embeds.shape[0]} (embeds rows), got shape {tuple(scores.shape)}"
        )
    if not scores.is_floating_point():
        raise ValueError(f"scores must be floating point, got {scores.dtype}")
    if groups is not None:
        if groups.dim() != 1 or groups.shape[0] != embeds.shape[0]:
            raise ValueError(f"groups must be [N] with N = {embeds.shape[0]}, got shape {tuple(groups.shape)}")
        if groups.dtype.is_floating_point or groups.dtype == torch.bool:
            raise ValueError(f"groups must be an integer tensor, got {groups.dtype}")
        if groups.numel() and int(groups.min()) < 0:
            raise ValueError("group ids must be >= 0")


def _empty(embeds: Tensor) -> Selection:
    return Selection.empty(embeds)


# --------------------------------------------------------------------------------------------
# group statistics shared by the fast path and `max_selectable`


class _Groups:
    """Per-group facts for one scale, with reference-exact comparisons.

    Attributes (G = number of distinct ids, ascending):
        ids `[G]`, inverse `[N]` (token -> group slot), counts `[G]`,
        high `[N]` bool (score > the group's float32 mean, strict),
        num_high `[G]`, order `[G]` group slots by mean descending (ties: ascending id),
        means `[G]` float64 group means (the exact float `mean()` where it mattered),
        fallbacks: groups whose float `mean()` had to be computed.

    With a `budget`, only the groups that can be reached are made exact; the others keep
    approximate facts but provably come after every reached group.
    """

    def __init__(self, scores: Tensor, groups: Tensor, budget: int | None = None) -> None:
        dev = scores.device
        ids, inverse, counts = torch.unique(groups, return_inverse=True, return_counts=True)
        g = ids.numel()
        s64 = scores.double()
        sums = torch.zeros(g, dtype=torch.float64, device=dev).index_add_(0, inverse, s64)
        abs_sums = torch.zeros_like(sums).index_add_(0, inverse, s64.abs())
        m64 = sums / counts.double()
        # torch's float `mean()` is fl(fl(sum) / n): any summation order is within
        # (n - 1) u sum|a| of the exact sum and the division adds u |mean|; twice that is a
        # safe band around m64 (itself exact to ~1e-16). A one-member mean is its member.
        unit = torch.finfo(scores.dtype).eps / 2
        tol = 2.0 * unit * (abs_sums + m64.abs())
        tol = torch.where(counts > 1, tol, torch.zeros_like(tol))
        band_all = float(tol.max()) if g else 0.0

        # Members inside their group's band: the strict `>` could go either way.
        gap = (s64 - m64[inverse]).abs()
        sure_high = (s64 > m64[inverse]) & (gap > tol[inverse])
        nearest = torch.full((g,), float("inf"), dtype=torch.float64, device=dev)
        nearest.scatter_reduce_(0, inverse, gap, reduce="amin")
        risky = nearest <= tol

        # Approximate order; groups whose band overlaps a neighbour's could swap.
        approx = torch.sort(m64, descending=True, stable=True).indices
        srt = m64[approx]
        if g > 1:
            diff = srt[:-1] - srt[1:]
            inf = diff.new_full((1,), float("inf"))
            near = torch.minimum(torch.cat([inf, diff]), torch.cat([diff, inf]))
            swap = torch.zeros(g, dtype=torch.bool, device=dev)
            swap[approx] = near <= tol[approx] + band_all
            risky |= swap
        risky &= counts > 1

        if budget is not None and g:
            # Every group emits >= 1 row plus its sure-high members. The groups S up to the
            # approximate rank where these lower bounds reach the budget precede (in exact
            # order) every group whose m64 lies more than two bands below the last of S, so
            # the walk never reaches those: they need no exact facts.
            rows_lo = torch.zeros(g, dtype=torch.int64, device=dev)
            rows_lo = rows_lo.index_add_(0, inverse, sure_high.long()) + 1
            cum = torch.cumsum(rows_lo[approx], 0)
            cut = min(int(torch.searchsorted(cum, budget)), g - 1)
            risky &= m64 >= float(srt[cut]) - 2.0 * band_all

        means = m64.clone()
        todo = risky.nonzero().squeeze(1)
        exact_known = counts == 1
        if todo.numel():
            # The reference's own op on the same values in the same (ascending position)
            # order: `scores[members].mean()` in the score dtype.
            by_group = torch.sort(inverse, stable=True).indices
            starts = (torch.cumsum(counts, 0) - counts).tolist()
            sizes = counts.tolist()
            for slot in todo.tolist():
                members = by_group[starts[slot] : starts[slot] + sizes[slot]]
                means[slot] = float(scores[members].mean().item())
            exact_known = exact_known | risky
        # Python's sort(reverse=True) on the float means is stable: equal means keep
        # ascending id order; torch's stable descending sort does the same.
        key = torch.where(exact_known, means, m64)
        self.order = torch.sort(key, descending=True, stable=True).indices
        self.ids, self.inverse, self.counts, self.means = ids, inverse, counts, means
        self.high = s64 > means[inverse]
        self.num_high = torch.zeros_like(counts).index_add_(0, inverse, self.high.long())
        self.fallbacks = int(todo.numel())


@autocast_off
def max_selectable(scores: Tensor, groups: Tensor) -> int:
    """Rows preserve-and-merge can emit with an unlimited budget: every above-mean token plus
    one merged row per group that has below-or-equal-mean members.

    Args:
        scores: `[N]` float relevance.
        groups: `[N]` int64 group ids >= 0.
    """
    if scores.numel() == 0:
        return 0
    info = _Groups(scores, groups)
    return int((info.num_high + (info.counts > info.num_high).long()).sum())


# --------------------------------------------------------------------------------------------
# preserve-and-merge


@autocast_off
def preserve_and_merge(
    embeds: Tensor,
    scores: Tensor,
    groups: Tensor,
    budget: int,
    *,
    exact: bool = False,
    singleton_is_merged: bool = True,
) -> Selection:
    """Greedy preserve-and-merge selection of at most `budget` rows.

    Args:
        embeds: `[N, D]` token embeddings (any float dtype; means accumulate in float64).
        scores: `[N]` float relevance (attention) of every token.
        groups: `[N]` int64 group id >= 0 of every token (cluster / segment).
        budget: rows to emit (int >= 0); fewer when there are fewer candidates.
        exact: run the reference's per-group loop (bitwise, slow) instead of the vectorised one.
        singleton_is_merged: a one-member group emits its member as a merged row
            (`merged=True, group=id`, K-Means semantics) or as a single row
            (`merged=False, group=-1`, SAM background semantics).

    Returns:
        `Selection` with rows in emission order; `embeds` in `embeds.dtype`.

    Raises:
        BudgetError: budget is not an integer >= 0.
        ValueError: shapes or dtypes do not fit.
    """
    budget = check_budget(budget)
    _check_inputs(embeds, scores, groups)
    if budget == 0 or embeds.shape[0] == 0:
        return _empty(embeds)
    groups = groups.to(torch.int64)
    if exact:
        return _preserve_and_merge_loop(embeds, scores, groups, budget, singleton_is_merged)
    return _preserve_and_merge_fast(embeds, scores, groups, budget, singleton_is_merged)


def _preserve_and_merge_fast(
    embeds: Tensor, scores: Tensor, groups: Tensor, budget: int, singleton_is_merged: bool
) -> Selection:
    n = embeds.shape[0]
    dev = embeds.device
    info = _Groups(scores, groups, budget)
    g = info.ids.numel()
    counts, num_high = info.counts, info.num_high
    has_low = counts > num_high
    # Rank of every group in visiting order and the first row each group would emit.
    grank = torch.empty(g, dtype=torch.int64, device=dev)
    grank[info.order] = torch.arange(g, device=dev)
    rows_per_group = (num_high + has_low.long())[info.order]
    first_row = torch.zeros(g, dtype=torch.int64, device=dev)
    first_row[info.order] = torch.cumsum(rows_per_group, 0) - rows_per_group

    # Emission order of tokens: by group rank; high tokens first by score descending (ties
    # by position), then the group's low tokens by position.
    by_score = torch.sort(scores, descending=True, stable=True).indices
    score_rank = torch.empty(n, dtype=torch.int64, device=dev)
    score_rank[by_score] = torch.arange(n, device=dev)
    position = torch.arange(n, device=dev)
    within = torch.where(info.high, score_rank, n + position)
    key = grank[info.inverse] * (2 * n) + within
    tokens = torch.sort(key).indices
    tok_group = info.inverse[tokens]
    # Tokens of a group are contiguous in `tokens`; high ones come first.
    group_start = torch.zeros(g, dtype=torch.int64, device=dev)
    group_start[info.order] = torch.cumsum(counts[info.order], 0) - counts[info.order]
    k_in_group = torch.arange(n, device=dev) - group_start[tok_group]
    tok_high = info.high[tokens]
    row = first_row[tok_group] + torch.where(tok_high, k_in_group, num_high[tok_group])
    keep = row < budget
    tokens, row, tok_group, tok_high = tokens[keep], row[keep], tok_group[keep], tok_high[keep]
    num_rows = int(row[-1]) + 1 if row.numel() else 0

    sizes = torch.bincount(row, minlength=num_rows)
    offsets = torch.zeros(num_rows + 1, dtype=torch.int64, device=dev)
    offsets[1:] = torch.cumsum(sizes, 0)
    row_first = tokens[offsets[:-1]]
    row_group = tok_group[offsets[:-1]]
    merged = ~tok_high[offsets[:-1]]

    out = embeds[row_first].clone()
    row_scores = scores[row_first].double()
    multi = (merged & (sizes > 1)).nonzero().squeeze(1)
    if multi.numel():
        # Merged rows: float64 member means (a one-member row is its member, exactly).
        in_multi = torch.isin(row, multi)
        member_tok = tokens[in_multi]
        slot = torch.searchsorted(multi, row[in_multi])
        acc = torch.zeros(multi.numel(), embeds.shape[1], dtype=torch.float64, device=dev)
        acc.index_add_(0, slot, embeds[member_tok].double())
        cnt = sizes[multi].double()[:, None]
        out[multi] = (acc / cnt).to(embeds.dtype)
        ssum = torch.zeros(multi.numel(), dtype=torch.float64, device=dev)
        ssum.index_add_(0, slot, scores[member_tok].double())
        row_scores[multi] = ssum / cnt.squeeze(1)
    group_out = torch.where(merged, info.ids[row_group], torch.full_like(row_group, -1))
    if not singleton_is_merged:
        single = merged & (counts[row_group] == 1)
        merged = merged & ~single
        group_out = torch.where(single, torch.full_like(group_out, -1), group_out)
    return Selection(
        embeds=out,
        positions=tokens,
        offsets=offsets,
        merged=merged,
        scores=row_scores,
        group=group_out,
    )


def _preserve_and_merge_loop(
    embeds: Tensor, scores: Tensor, groups: Tensor, budget: int, singleton_is_merged: bool
) -> Selection:
    """The reference's loop (parity README step 8), op for op."""
    dev = embeds.device
    ranked = []
    for c in torch.unique(groups).tolist():
        ranked.append((c, float(scores[groups == c].mean().item())))
    ranked.sort(key=lambda item: item[1], reverse=True)  # stable, like the reference
    rows: list[Tensor] = []
    members: list[Tensor] = []
    merged: list[bool] = []
    row_scores: list[float] = []
    row_group: list[int] = []
    remaining = budget
    for c, mean in ranked:
        if remaining <= 0:
            break
        idx = (groups == c).nonzero().squeeze(1)
        a = scores[idx]
        high = idx[a > mean]
        low = idx[a <= mean]
        if high.numel():
            for i in high[torch.argsort(scores[high], descending=True)]:
                rows.append(embeds[i])
                members.append(i.reshape(1))
                merged.append(False)
                row_scores.append(float(scores[i].item()))
                row_group.append(-1)
                remaining -= 1
                if remaining == 0:
                    break
        if remaining > 0 and low.numel():
            single = low.numel() == 1 and idx.numel() == 1 and not singleton_is_merged
            if single:
                rows.append(embeds[low[0]])
            else:
                rows.append(embeds[low].mean(0))
            members.append(low)
            merged.append(not single)
            row_scores.append(float(scores[low].mean().item()))
            row_group.append(-1 if single else int(c))
            remaining -= 1
    if not rows:
        return _empty(embeds)
    sizes = torch.tensor([m.numel() for m in members], dtype=torch.int64, device=dev)
    offsets = torch.zeros(len(rows) + 1, dtype=torch.int64, device=dev)
    offsets[1:] = torch.cumsum(sizes, 0)
    return Selection(
        embeds=torch.stack(rows).to(embeds.dtype),
        positions=torch.cat(members).to(torch.int64),
        offsets=offsets,
        merged=torch.tensor(merged, dtype=torch.bool, device=dev),
        scores=torch.tensor(row_scores, dtype=torch.float64, device=dev),
        group=torch.tensor(row_group, dtype=torch.int64, device=dev),
    )


# --------------------------------------------------------------------------------------------
# selectors


@autocast_off
def select_topk(embeds: Tensor, scores: Tensor, budget: int) -> Selection:
    """The `min(budget, N)` most relevant tokens as single rows, by descending score.

    Args:
        embeds: `[N, D]` token embeddings.
        scores: `[N]` float relevance.
        budget: int >= 0.

    Equal scores keep ascending position order (a stable sort, so results are deterministic).
    """
    budget = check_budget(budget)
    _check_inputs(embeds, scores)
    k = min(budget, embeds.shape[0])
    if k == 0:
        return _empty(embeds)
    dev = embeds.device
    top = torch.sort(scores, descending=True, stable=True).indices[:k]
    return Selection(
        embeds=embeds[top],
        positions=top,
        offsets=torch.arange(k + 1, dtype=torch.int64, device=dev),
        merged=torch.zeros(k, dtype=torch.bool, device=dev),
        scores=scores[top].double(),
        group=torch.full((k,), -1, dtype=torch.int64, device=dev),
    )


@autocast_off
def cluster_tokens(
    embeds: Tensor,
    budget: int,
    *,
    num_tiles: int,
    num_clusters: int | None = None,
    max_iters: int | None = 10,
    generator: torch.Generator | None = None,
    mode: str = "fast",
    feat_scale: float = 1.0,
    coord_scale: float = 0.05,
    tokens_per_side: int = CLIP_336_14.tokens_per_side,
) -> KMeansResult:
    """The grouping step of the `kmeans` selector (method §4.1): K-Means on
    `clustering_features(embeds)` with K = `num_clusters` if > 0, else the budget (then
    `min(max(1, K), N)`); `preserve_and_merge` by its labels is the selection step."""
    n = embeds.shape[0]
    k = num_clusters if num_clusters is not None and num_clusters > 0 else budget
    k = min(max(1, int(k)), n)
    feats = clustering_features(embeds, num_tiles, feat_scale, coord_scale, tokens_per_side)
    return kmeans(feats, k, 10 if max_iters is None else max_iters, generator=generator, mode=mode)


@autocast_off
def select_segments(embeds: Tensor, scores: Tensor, budget: int, segment_ids: Tensor) -> Selection:
    """SAM branch (method §4.2): background tokens compete singly, segments as groups.

    Args:
        embeds: `[N, D]` token embeddings.
        scores: `[N]` relevance.
        budget: rows to emit (int >= 0).
        segment_ids: `[N]` int64, 0 = background, id > 0 = one segment (across tiles).

    Returns:
        `Selection`; background rows are single (`merged=False, group=-1`), a segment's merged
        row has `group` = its segment id (a one-token segment is a merged row too, as in the
        reference). Ties in the candidate order put background tokens (by position) before
        segments (by id).
    """
    budget = check_budget(budget)
    _check_inputs(embeds, scores, segment_ids)
    n = embeds.shape[0]
    seg = segment_ids.to(torch.int64)
    # Background token p -> group p; segment s -> group n + s. Ascending group ids give the
    # tie order; background groups are singletons, so they come out as single rows.
    positions = torch.arange(n, device=seg.device)
    remapped = torch.where(seg > 0, n + seg, positions)
    sel = preserve_and_merge(embeds, scores, remapped, budget, singleton_is_merged=True)
    background = sel.merged & (sel.group >= 0) & (sel.group < n)
    sel.merged = sel.merged & ~background
    sel.group = torch.where(
        background, torch.full_like(sel.group, -1), torch.where(sel.group >= n, sel.group - n, sel.group)
    )
    return sel
