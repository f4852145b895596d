"""Fast-mode distances kept in an N×K cache; only the columns of centres that moved are redone.

Why this is exact: `torch.cdist` (its matmul path, which it takes for these sizes) computes
`clamp_min(x_ @ y_.mT, 1e-30).sqrt()` with `x_ = cat([-2x, |x|², 1])` and `y_ = cat([c, 1, |c|²])`.
An entry depends only on its point and its centre, so an unmoved centre's column is still
exactly what a fresh `cdist` would give. On x86/MKL every entry of a sub-product `A @ B.mT`
whose `A` has at least 16 rows and `B` at least 2 is bitwise the entry of the full product,
whichever operand holds the points (for feature widths up to ~1000: checked for 66, 130 and
514/516 wide features, the benchmark's); subsets are padded to `MIN_GEMM_ROWS` /
`MIN_GEMM_COLS` to stay well inside that.
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


class CachedDistances:
    """`cdist` matrix kept across iterations; only the columns of moved centres are redone.

    `torch.cdist` (matmul path) computes `clamp_min(x_ @ y_.mT, 1e-30).sqrt()` with
    `x_ = cat([-2 x, |x|², 1])` and `y_ = cat([c, 1, |c|²])`. `x_` does not depend on the
    centres, so it is built once. The first refresh is that very GEMM (same shapes, one call, so
    bitwise `torch.cdist` at any width) when the matrix is small enough; other full refreshes run
    by L2-sized row blocks, and a column refresh is the same formula on a column subset. The
    cache is stored transposed, `[K, N]`, so that refreshing a few columns writes a few
    contiguous rows.

    Labels are kept equal to the cache's first-index argmin without rescanning rows: with the
    invariant "every non-own entry is > the own one, or equal with a larger index", only moved
    columns can take a point over, unless its own centre moved away; for that case a per-point
    lower bound `second` on its non-own entries settles most points, the rest are rescanned.
    """

    def __init__(self, x: Tensor, k: int) -> None:
        self.n, self.f = x.shape
        self.k = k
        norms = x.pow(2).sum(-1, keepdim=True)
        self.xa = torch.cat([x.mul(-2), norms, torch.ones_like(norms)], dim=-1)
        self.dist_t = torch.empty(k, self.n, dtype=x.dtype, device=x.device)
        self.second = torch.empty(self.n, dtype=x.dtype, device=x.device)
        self.evaluations = 0

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
        ya = self._augment(centers)
        self.evaluations += self.n * self.k
        if previous is None and self.n * self.k * self.dist_t.element_size() <= 2 * CHUNK_BYTES:
            # The first refresh is `torch.cdist`'s own GEMM, same shapes, one call: bitwise
            # torch.cdist at any feature width, so labels_iter1 is exact.
            return self._rows(self.xa, ya, 0)
        # Otherwise by row blocks small enough that the clamp/sqrt/min passes run on
        # cache-resident data (bitwise torch.cdist for feature widths up to ~1000, see the
        # module docstring); the argmin runs along the rows' contiguous dim.
        labels = torch.empty(self.n, dtype=torch.int64, device=self.xa.device)
        step = max(MIN_GEMM_ROWS, FULL_CHUNK_BYTES // (self.k * self.dist_t.element_size()))
        for start in range(0, self.n, step):
            xs = self.xa[start : start + step]
            r = xs.shape[0]
            if r < min(self.n, MIN_GEMM_ROWS):  # a short last block: pad with earlier rows
                xs = self.xa[self.n - min(self.n, MIN_GEMM_ROWS) :]
            labels[start : start + r] = self._rows(xs, ya, start + r - xs.shape[0])[-r:]
        return labels

    def _rows(self, xs: Tensor, ya: Tensor, start: int) -> Tensor:
        """Distances of the points `xs` (`xa[start : start + len(xs)]`) to every centre: written
        to the cache with their `second`; returns their first-index argmin labels."""
        block = torch.matmul(xs, ya.mT).clamp_min_(1e-30).sqrt_()
        own, labels = block.min(dim=1)  # first index of the minimum, like argmin
        at = labels[:, None]
        block.scatter_(1, at, math.inf)
        stop = start + xs.shape[0]
        torch.amin(block, dim=1, out=self.second[start:stop])
        block.scatter_(1, at, own[:, None])
        self.dist_t[:, start:stop].copy_(block.T)
        return labels

    def _rescan(self, rows: Tensor, labels: Tensor) -> None:
        """Exact argmin and second-smallest entry of the given points, from the cache."""
        cols = self.dist_t.index_select(1, rows)
        lab = cols.min(dim=0).indices  # first index of the minimum, like argmin
        labels[rows] = lab
        cols.scatter_(0, lab[None, :], math.inf)
        self.second[rows] = cols.amin(dim=0)

    def step(self, centers: Tensor, old_centers: Tensor, moved: Tensor, labels: Tensor) -> Tensor:
        """Refresh the moved columns and return the new `[N]` argmin labels (first-index ties)."""
        m = moved.numel()
        if m == 0:
            return labels
        if 10 * m >= 9 * self.k:
            return self._full(centers, previous=labels)
        dev = moved.device
        # The column set is the row count of the transposed GEMM: few rows would make BLAS
        # use another kernel (another summation order), so pad with unmoved centres (their
        # entries are rewritten unchanged).
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
        flat = self.dist_t.view(-1)
        step = self._rows_per_chunk(mc)
        for start in range(0, self.n, step):
            stop = min(self.n, start + step)
            r = stop - start
            xs = self.xa[start:stop]
            if r < min(self.n, MIN_GEMM_ROWS):
                xs = torch.cat([xs, self.xa[: MIN_GEMM_ROWS - r]])
            # The transposed product lands contiguous in the [K, N] cache.
            block_t = torch.matmul(ya, xs.mT)[:, :r].clamp_min_(1e-30).sqrt_()
            idx = torch.arange(start, stop, device=dev)
            lab = labels[start:stop]
            own_at = lab * self.n + idx
            va_old = flat[own_at]
            self.dist_t[:, start:stop].index_copy_(0, cols, block_t)
            va = flat[own_at]
            # Smallest moved entry other than the own one.
            own_slot = slot_of[lab]
            own_moved = (own_slot >= 0).nonzero().squeeze(1)
            moved_t = block_t[:m]
            moved_t[own_slot[own_moved], own_moved] = math.inf
            vm = moved_t.amin(dim=0)
            # Invariant: every unmoved non-own entry is > the old own one (or equal with a
            # larger index), and >= second. So the old label a loses only to a moved column j
            # with d_j < d_a, or d_j == d_a and j < a (argmin keeps the first index) - unless
            # a moved farther and the unmoved entries can no longer be ruled out: rescan those.
            lb = self.second[start:stop]
            unsure = (va > va_old) & (torch.minimum(va, vm) >= lb)
            rescan[start:stop] = unsure
            cand = ((vm <= va) & ~unsure).nonzero().squeeze(1)
            second = torch.minimum(lb, vm)
            if cand.numel():
                jm = moved[moved_t.index_select(1, cand).min(dim=0).indices]
                lab_c = lab[cand]
                take = (vm[cand] < va[cand]) | (jm < lab_c)
                new_labels[start + cand] = torch.where(take, jm, lab_c)
                # After a switch the old own entry becomes a non-own one.
                switched = cand[take]
                second[switched] = torch.minimum(second[switched], va[switched])
            self.second[start:stop] = second
        om = rescan.nonzero().squeeze(1)
        if om.numel():
            self._rescan(om, new_labels)
        self.evaluations += self.n * mc
        return new_labels
