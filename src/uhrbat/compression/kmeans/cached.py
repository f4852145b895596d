"""Fast-mode distances kept in an N×K cache; only the columns of centres that moved are redone,
and only for the points that a moved centre could take over (or whose own centre moved).

Why this is exact: `torch.cdist` (its matmul path, which it takes for these sizes) computes
`clamp_min(x_ @ y_.mT, 1e-30).sqrt()` with `x_ = cat([-2x, |x|², 1])` and `y_ = cat([c, 1, |c|²])`.
An entry depends only on its point and its centre, so an unmoved centre's column is still
exactly what a fresh `cdist` would give. On x86/MKL every entry of a sub-product `A @ B.mT`
whose `A` has at least 16 rows and `B` at least 2 is bitwise the entry of the full product,
whichever operand holds the points (for feature widths up to ~1000: checked for 66, 130 and
514/516 wide features, the benchmark's); subsets are padded to `MIN_GEMM_ROWS` /
`MIN_GEMM_COLS` to stay well inside that.

Points that no moved centre can take over are skipped (`_prune`): their entries in the moved
columns are replaced by float-error-safe lower bounds (see `CachedDistances` for the proof), so
an entry of the cache is either bitwise the `cdist` value or a lower bound of it, and the own
entry of every point (its label's column) is always exact.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from uhrbat.compression.kmeans.common import CHUNK_BYTES, MIN_GEMM_COLS, MIN_GEMM_ROWS

__all__ = ["CachedDistances"]

# Chunk of a column refresh: small enough that the clamp/sqrt/min passes after each GEMM block
# run on cache-resident data (the GEMM rows, hence the values, are unchanged).
STEP_CHUNK_BYTES = 32 * 1024 * 1024
# Row block of a full refresh ([rows, K] distances): about the size of a core's L2 cache.
FULL_CHUNK_BYTES = 2 * 1024 * 1024
# Largest first refresh done as one GEMM call (bitwise `torch.cdist` whatever the kernels);
# larger ones go by row blocks, like every later refresh (no N×K temporary besides the cache).
ONE_CALL_BYTES = 32 * 1024 * 1024
# Points are tested for skipping only when at most this fraction of the centres moved: the test
# reads the moved columns of the cache (a few ns per entry), the refresh it saves costs a
# 2·F-flop GEMM entry plus the stream of the point's features.
PRUNE_MAX_MOVED = 0.07
# Slack constants of the skip test (see `CachedDistances`): generous against float32 rounding
# (u = 2**-24) of the few operations that evaluate the bounds.
_C1 = 1.0 - 2.0**-19
_SLACK = 2.0**-18
_UP = 1.0 + 2.0**-20


class CachedDistances:
    """`cdist` matrix kept across iterations; only the columns of moved centres are redone.

    `torch.cdist` (matmul path) computes `clamp_min(x_ @ y_.mT, 1e-30).sqrt()` with
    `x_ = cat([-2 x, |x|², 1])` and `y_ = cat([c, 1, |c|²])`. `x_` does not depend on the
    centres, so it is built once. The first refresh is that very GEMM (same shapes, one call, so
    bitwise `torch.cdist` at any width) when the matrix is small enough; other full refreshes run
    by L2-sized row blocks, and a column refresh is the same formula on a column subset. The
    cache is stored transposed, `[K, N]`, so that refreshing a few columns writes a few
    contiguous rows.

    Labels are kept equal to the `cdist` first-index argmin without rescanning rows: with the
    invariant "every non-own `cdist` value is > the own one, or equal with a larger index", only
    moved columns can take a point over, unless its own centre moved away; for that case a
    per-point lower bound `second` on its non-own values settles most points, the rest are
    rescanned: from the cache when their row is exact (`inexact` False: never skipped since its
    last full computation), else by a GEMM of the full row (the cache holds bounds there).

    **Skipping points** (`_prune`, when few centres moved). Let `v` be a computed `cdist` value,
    `G` the GEMM result it is the clamped square root of, `E` the exact distance of the float
    vectors, `u` the unit roundoff, `n = F + 2`, `γ = n·u / (1 - n·u)`. The GEMM sums n products,
    so `|G - Σ a_k b_k| <= γ Σ|a_k b_k|` whatever the summation order; with the norms' own
    rounding, `|G - E²| <= η = 2.5 γ (|x| + c_max)²` (c_max: largest centre norm, old or new).
    For a cached `W <= v` (exact or a bound), `E >= sqrt(max(0, (W(1-u))² - η))`; a centre
    moved by at most `s` (float64 norm, rounded up) is at `E' >= E - s`; and the new value is
    `v' >= sqrt(max(0, E'² - η))·(1-u)`. With `R = sqrt(η + (own/(1-u))²)` and
    `P = R + η/(2R)`, `W(1-u) - s > P` gives `E - s > sqrt((s + R)² + η) - s >= R` (as
    `sqrt(t² + η) <= t + η/(2t)`), hence `E'² - η > (own/(1-u))²` and `v' > own`: strictly
    farther than the point's own (exact, unmoved) entry, so that centre cannot take the point
    over, tie or not. A point whose own centre did not move and for which this holds for every
    moved centre keeps its label; instead of the exact new entries the cache keeps
    `max(own, (W(1-u) - s - η/R - η/b)(1-u))`, `b = R - η/(2R)`, a lower bound of `v'` (by
    `sqrt(a² - η) >= a - η/a` twice, valid when `b² >= η`; otherwise just `own`). The test is
    evaluated in the cache dtype as `fl(fl(W·C1) - s) > P + slack`, which implies the real
    inequality (the constants absorb every rounding; derivation in `_prune`).
    """

    def __init__(self, x: Tensor, k: int) -> None:
        self.n, self.f = x.shape
        self.k = k
        norms = x.pow(2).sum(-1, keepdim=True)
        self.xa = torch.cat([x.mul(-2), norms, torch.ones_like(norms)], dim=-1)
        self.dist_t = torch.empty(k, self.n, dtype=x.dtype, device=x.device)
        self.own = torch.empty(self.n, dtype=x.dtype, device=x.device)  # dist_t[labels[i], i], exact
        self.second = torch.empty(self.n, dtype=x.dtype, device=x.device)  # <= every non-own value
        # Points whose row may hold a lower bound instead of the `cdist` value (skipped once).
        self.inexact = torch.zeros(self.n, dtype=torch.bool, device=x.device)
        self.evaluations = 0
        # Error model of the skip test (float64): unit roundoff, the GEMM's gamma_n, |x_i|.
        self.unit = torch.finfo(x.dtype).eps / 2
        terms = self.f + 3
        self.gamma = terms * self.unit / (1.0 - terms * self.unit)
        step = max(1, CHUNK_BYTES // (8 * self.f))
        self.xnorm = torch.cat([c.double().norm(dim=1) for c in x.split(step)])
        self.centers: Tensor | None = None

    @staticmethod
    def _augment(c: Tensor) -> Tensor:
        norms = c.pow(2).sum(-1, keepdim=True)
        return torch.cat([c, torch.ones_like(norms), norms], dim=-1)

    def _rows_per_chunk(self, cols: int) -> int:
        per_row = (self.f + 2 + 3 * cols) * self.dist_t.element_size()
        return max(MIN_GEMM_ROWS, STEP_CHUNK_BYTES // per_row)

    def first(self, centers: Tensor) -> Tensor:
        """Fill the whole cache; `[N]` argmin labels."""
        return self._full(centers)

    def _full(self, centers: Tensor, previous: Tensor | None = None) -> Tensor:
        """Recompute every entry; `previous` = the labels before (None on the first call)."""
        self.centers = centers
        ya = self._augment(centers)
        self.evaluations += self.n * self.k
        labels = torch.empty(self.n, dtype=torch.int64, device=self.xa.device)
        if previous is None and self.n * self.k * self.dist_t.element_size() <= ONE_CALL_BYTES:
            # The first refresh is `torch.cdist`'s own GEMM, same shapes, one call: bitwise
            # torch.cdist at any feature width, so labels_iter1 is exact.
            self._rows(self.xa, ya, torch.arange(self.n, device=self.xa.device), labels)
            return labels
        # Otherwise by row blocks small enough that the clamp/sqrt/min passes run on
        # cache-resident data (bitwise torch.cdist for feature widths up to ~1000, see the
        # module docstring); the argmin runs along the rows' contiguous dim.
        step = max(MIN_GEMM_ROWS, FULL_CHUNK_BYTES // (self.k * self.dist_t.element_size()))
        for start in range(0, self.n, step):
            stop = min(self.n, start + step)
            self._rows(self.xa[start:stop], ya, torch.arange(start, stop, device=self.xa.device), labels)
        return labels

    def _rows(self, xs: Tensor, ya: Tensor, rows: Tensor, labels: Tensor) -> None:
        """Exact distances of the points `rows` (`xs = xa[rows]`) to every centre: written to the
        cache with their own entry and `second`, their first-index argmin into `labels[rows]`."""
        r = rows.numel()
        if r < min(self.n, MIN_GEMM_ROWS):  # few rows: pad with other points (BLAS kernel choice)
            xs = torch.cat([xs, self.xa[: min(self.n, MIN_GEMM_ROWS) - r]])
        block = torch.matmul(xs, ya.mT)[:r].clamp_min_(1e-30).sqrt_()
        own, lab = block.min(dim=1)  # first index of the minimum, like argmin
        at = lab[:, None]
        block.scatter_(1, at, math.inf)
        self.second[rows] = block.amin(dim=1)
        block.scatter_(1, at, own[:, None])
        if r == self.n:
            self.dist_t.copy_(block.T)
        elif int(rows[-1]) - int(rows[0]) + 1 == r:  # a contiguous run of points
            self.dist_t[:, int(rows[0]) : int(rows[0]) + r].copy_(block.T)
        else:
            self.dist_t.index_copy_(1, rows, block.T)
        labels[rows] = lab
        self.own[rows] = own
        self.inexact[rows] = False

    def _rescan(self, rows: Tensor, labels: Tensor) -> None:
        """Argmin, own entry and `second` of the given points from their cached rows (which must
        be exact: no GEMM)."""
        cols = self.dist_t.index_select(1, rows)
        own, lab = cols.min(dim=0)  # first index of the minimum, like argmin
        cols.scatter_(0, lab[None, :], math.inf)
        self.second[rows] = cols.amin(dim=0)
        labels[rows] = lab
        self.own[rows] = own

    def _recompute(self, rows: Tensor, labels: Tensor) -> None:
        """Exact full rows (argmin, own entry, `second`) of the given points, by GEMM: their
        cached entries may be lower bounds, so they are not read."""
        assert self.centers is not None
        ya = self._augment(self.centers)
        step = max(MIN_GEMM_ROWS, FULL_CHUNK_BYTES // (self.k * self.dist_t.element_size()))
        for part in rows.split(step):
            self._rows(self.xa.index_select(0, part), ya, part, labels)
        self.evaluations += rows.numel() * self.k

    def step(self, centers: Tensor, old_centers: Tensor, moved: Tensor, labels: Tensor) -> Tensor:
        """Refresh the moved columns and return the new `[N]` argmin labels (first-index ties)."""
        m = moved.numel()
        if m == 0:
            return labels
        if 10 * m >= 9 * self.k:
            return self._full(centers, previous=labels)
        self.centers = centers
        dev = moved.device
        # The column set is the row count of the transposed GEMM: few rows would make BLAS
        # use another kernel (another summation order), so pad with unmoved centres (their
        # entries are recomputed: exact, never below what the cache held).
        cols = moved
        if m < MIN_GEMM_COLS and self.k > m:
            unmoved = torch.ones(self.k, dtype=torch.bool, device=dev)
            unmoved[moved] = False
            cols = torch.cat([moved, unmoved.nonzero().squeeze(1)[: MIN_GEMM_COLS - m]])
        mc = cols.numel()
        ya = self._augment(centers[cols])
        slot_of = torch.full((self.k,), -1, dtype=torch.int64, device=dev)
        slot_of[moved] = torch.arange(m, device=dev)
        new_labels = labels.clone()
        rescan = torch.zeros(self.n, dtype=torch.bool, device=dev)
        bounds = self._bounds(centers, old_centers, moved) if m <= PRUNE_MAX_MOVED * self.k else None
        step = self._rows_per_chunk(mc)
        computed = 0
        for start in range(0, self.n, step):
            stop = min(self.n, start + step)
            if bounds is None:
                rows = torch.arange(start, stop, device=dev)
                block_t = self._block(self.xa[start:stop], ya)
                self.dist_t[:, start:stop].index_copy_(0, cols, block_t)
            else:
                low, need = self._prune(bounds, moved, slot_of, labels, start, stop)
                if need.numel():
                    rows = need + start
                    block_t = self._block(self.xa.index_select(0, rows), ya)
                    # Exact entries where computed; the padding columns are unmoved, so what
                    # the cache holds for them (exact or a bound) stays valid.
                    low.index_copy_(1, need, block_t[:m])
                self.dist_t[:, start:stop].index_copy_(0, moved, low)
                if not need.numel():
                    continue
            computed += rows.numel()
            self._relabel(block_t, rows, moved, slot_of, labels, new_labels, rescan)
        # Rows never skipped are exact in the cache: rescan them there; others need a GEMM.
        om = (rescan & ~self.inexact).nonzero().squeeze(1)
        if om.numel():
            self._rescan(om, new_labels)
        om = (rescan & self.inexact).nonzero().squeeze(1)
        if om.numel():
            self._recompute(om, new_labels)
        self.evaluations += computed * mc
        return new_labels

    def _block(self, xs: Tensor, ya: Tensor) -> Tensor:
        """`[C, r]` exact distances of the `r` points `xs` to the augmented centres `ya`."""
        r = xs.shape[0]
        if r < min(self.n, MIN_GEMM_ROWS):  # few rows: pad with other points (BLAS kernel choice)
            xs = torch.cat([xs, self.xa[: min(self.n, MIN_GEMM_ROWS) - r]])
        # The transposed product lands contiguous in the [K, N] cache.
        return torch.matmul(ya, xs.mT)[:, :r].clamp_min_(1e-30).sqrt_()

    def _relabel(
        self,
        block_t: Tensor,
        rows: Tensor,
        moved: Tensor,
        slot_of: Tensor,
        labels: Tensor,
        new_labels: Tensor,
        rescan: Tensor,
    ) -> None:
        """Labels, own entries and `second` of the points `rows` after the move, from their
        exact entries `block_t` in the moved columns (its first `len(moved)` rows; modified)."""
        m = moved.numel()
        lab = labels[rows]
        va_old = self.own[rows]
        # Smallest moved entry other than the own one; the own entry if the own centre moved.
        own_slot = slot_of[lab]
        own_moved = (own_slot >= 0).nonzero().squeeze(1)
        moved_t = block_t[:m]
        va = va_old.clone()
        va[own_moved] = moved_t[own_slot[own_moved], own_moved]
        moved_t[own_slot[own_moved], own_moved] = math.inf
        vm = moved_t.amin(dim=0)
        # Invariant: every unmoved non-own value is > the old own one (or equal with a larger
        # index), and >= second. So the old label a loses only to a moved column j with
        # d_j < d_a, or d_j == d_a and j < a (argmin keeps the first index) - unless a moved
        # farther and the unmoved values can no longer be ruled out: recompute those.
        lb = self.second[rows]
        unsure = (va > va_old) & (torch.minimum(va, vm) >= lb)
        rescan[rows] = unsure
        cand = ((vm <= va) & ~unsure).nonzero().squeeze(1)
        second = torch.minimum(lb, vm)
        if cand.numel():
            # First index of the minimum along the contiguous dim (a strided min is ~4x slower).
            jm = moved[moved_t.index_select(1, cand).T.contiguous().min(dim=1).indices]
            lab_c = lab[cand]
            take = (vm[cand] < va[cand]) | (jm < lab_c)
            new_labels[rows[cand]] = torch.where(take, jm, lab_c)
            # After a switch the old own entry becomes a non-own one, the moved one the own.
            switched = cand[take]
            second[switched] = torch.minimum(second[switched], va[switched])
            va[switched] = vm[switched]
        self.second[rows] = second
        self.own[rows] = va

    def _bounds(self, centers: Tensor, old_centers: Tensor, moved: Tensor) -> tuple[Tensor, Tensor, float]:
        """Per-move quantities of the skip test: shifts `s` (rounded up, cache dtype), the
        per-point GEMM error bound `η` (float64) and a bound on every cached value."""
        shift = (centers[moved].double() - old_centers[moved].double()).norm(dim=1)
        s = (shift * _UP).to(self.dist_t.dtype)  # float64 norm error << 2**-20: s >= the shift
        cmax = max(float(centers.double().norm(dim=1).max()), float(old_centers.double().norm(dim=1).max()))
        eta = 2.5 * self.gamma * (self.xnorm + cmax) ** 2
        wmax = 2.0 * (float(self.xnorm.max()) + cmax) + 1.0
        return s, eta, wmax

    def _prune(
        self,
        bounds: tuple[Tensor, Tensor, float],
        moved: Tensor,
        slot_of: Tensor,
        labels: Tensor,
        start: int,
        stop: int,
    ) -> tuple[Tensor, Tensor]:
        """`(low, need)`: `[m, r]` lower bounds of the new moved entries of the points
        `[start, stop)` (valid where the point is skipped) and the chunk positions of the points
        that need them computed (own centre moved, or a moved centre might take them over).
        `second` of the skipped points is lowered to match.

        Rounding (cache dtype, unit u <= 2**-24; C1 = 1 - 2**-19, slack = 2**-18 (1 + W_max)):
        a computed `q = fl(fl(W·C1) - s) > P + slack/2` implies `W·C1(1+u) - s > P`, and
        `C1(1+u) < 1 - u`, so `W(1-u) - s > P` (class docstring). The stored bound
        `max(own, fl(q - D))` with `D = η/R + η/b + slack` is <= `(W(1-u) - s - η/R - η/b)(1-u)`
        because `fl(W·C1) <= W(1-u)²` and the slack exceeds the remaining roundings.
        """
        s, eta_all, wmax = bounds
        unit = self.unit
        eta = eta_all[start:stop]
        own = self.own[start:stop]
        r_ = torch.sqrt(eta + (own.double() / (1.0 - unit)) ** 2)
        p = ((r_ + eta / (2.0 * r_) + 0.5 * _SLACK * (1.0 + wmax)) * _UP).to(own.dtype)
        b = r_ - eta / (2.0 * r_)
        d = (eta / r_ + eta / b + _SLACK * (1.0 + wmax)) * _UP
        d = torch.where(b * b >= eta, d, math.inf).to(own.dtype)
        q = self.dist_t[moved, start:stop].mul_(_C1).sub_(s[:, None])
        need = (q <= p).any(dim=0) | (slot_of[labels[start:stop]] >= 0)
        low = torch.maximum(q.sub_(d), own)
        # Skipped points: every non-own value is still >= the lowered `second`.
        sec = self.second[start:stop]
        self.second[start:stop] = torch.where(need, sec, torch.minimum(sec, low.amin(dim=0)))
        self.inexact[start:stop] |= ~need
        return low, need.nonzero().squeeze(1)
