"""Fast-mode distances without a cache: triangle-inequality bounds (Hamerly/Yinyang style).

Used when the N×K cache of `cached.CachedDistances` would exceed the fast mode's cache limit.
Rows whose bounds cannot certify their label get a full `cdist` row (bitwise the full product's
row, see `cached`); the float-error margin that makes a skip safe is derived in the class
docstring.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from uhrbat.compression.kmeans.common import CHUNK_BYTES, MIN_GEMM_ROWS

__all__ = ["BoundedDistances"]

# Number of per-point lower bounds (centre groups) kept.
MAX_BOUND_GROUPS = 64


class BoundedDistances:
    """Hamerly/Yinyang-style bounds; rows that fail the test get a full `cdist` row.

    Bounds are on exact distances, in float64. `cdist` (matmul form) computes d² with an
    absolute error of at most `err_i = coef (|x_i| + max|c|)²`, `coef = 4 (F + 4) u` (a generous
    form of the gamma_n dot-product bound, u = unit roundoff). A point is skipped only when
    its closest other centre is provably farther in squared distance by `2 err + guard`, so its
    computed own distance is strictly the smallest, even after the final float sqrt.
    """

    def __init__(self, x: Tensor, k: int) -> None:
        self.x = x
        self.n, self.f = x.shape
        self.k = k
        self.groups = max(1, min(k, MAX_BOUND_GROUPS))
        self.group_size = -(-k // self.groups)
        self.unit = torch.finfo(x.dtype).eps / 2
        self.err_coef = 4.0 * (self.f + 4) * self.unit
        step = max(1, CHUNK_BYTES // (8 * self.f))
        self.xnorm = torch.cat([c.double().norm(dim=1) for c in x.split(step)])
        per_row = self.f * x.element_size() + 3 * k * 4 + 16 * self.groups
        self.chunk = max(MIN_GEMM_ROWS, CHUNK_BYTES // per_row)
        self.min_rows = min(self.n, MIN_GEMM_ROWS)
        self.upper = torch.empty(0)
        self.lower = torch.empty(0)
        self.evaluations = 0

    def _err(self, rows: Tensor | None, cmax: float) -> Tensor:
        xn = self.xnorm if rows is None else self.xnorm[rows]
        return self.err_coef * (xn + cmax) ** 2

    def _group_reduce(self, v: Tensor, fill: float, op: str) -> Tensor:
        if self.groups == self.k:
            return v
        pad = self.groups * self.group_size - self.k
        if pad:
            v = torch.cat([v, v.new_full((*v.shape[:-1], pad), fill)], dim=-1)
        v = v.view(*v.shape[:-1], self.groups, self.group_size)
        return v.amin(dim=-1) if op == "min" else v.amax(dim=-1)

    def _assign(self, rows: Tensor | None, centers: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Full rows -> labels `[r]`, upper `[r]`, lower `[r, G]` (float64 bounds)."""
        cmax = float(centers.double().norm(dim=1).max())
        count = self.n if rows is None else rows.numel()
        dev = self.x.device
        labels = torch.empty(count, dtype=torch.int64, device=dev)
        upper = torch.empty(count, dtype=torch.float64, device=dev)
        lower = torch.empty(count, self.groups, dtype=torch.float64, device=dev)
        f_up, f_dn = 1.0 + 4 * self.unit, 1.0 - 4 * self.unit
        for start in range(0, count, self.chunk):
            stop = min(count, start + self.chunk)
            sel = None if rows is None else rows[start:stop]
            xs = self.x[start:stop] if sel is None else self.x[sel]
            r = xs.shape[0]
            if r < self.min_rows:
                xs = torch.cat([xs, self.x[: self.min_rows - r]], dim=0)
            d = torch.cdist(xs, centers, p=2.0, compute_mode="use_mm_for_euclid_dist")[:r]
            lab = d.argmin(dim=1)
            own = d.gather(1, lab[:, None]).squeeze(1).double()
            d.scatter_(1, lab[:, None], math.inf)
            other = self._group_reduce(d, math.inf, "min").double()
            xn = self.xnorm[start:stop] if sel is None else self.xnorm[sel]
            err = self.err_coef * (xn + cmax) ** 2
            # d = fl(sqrt(d²_computed)), so d² is within a factor (1 +- 4u) of d²_computed.
            labels[start:stop] = lab
            upper[start:stop] = (own * own * f_up + err).sqrt()
            lower[start:stop] = (other * other * f_dn - err[:, None]).clamp_min(0.0).sqrt()
        self.evaluations += count * self.k
        return labels, upper, lower

    def first(self, centers: Tensor) -> Tensor:
        labels, self.upper, self.lower = self._assign(None, centers)
        return labels

    def _failing(self, lower: Tensor, upper: Tensor, err: Tensor) -> Tensor:
        lmin = lower.amin(dim=1)
        gap = (lmin - upper) * (lmin + upper)
        ok = (lmin > upper) & (gap > 2.0 * err + 16.0 * self.unit * lmin * lmin)
        return (~ok).nonzero().squeeze(1)

    def step(self, centers: Tensor, old_centers: Tensor, moved: Tensor, labels: Tensor) -> Tensor:
        """Move the bounds by the centre shifts, recompute the rows they cannot certify."""
        shift = (centers.double() - old_centers.double()).norm(dim=1) * (1.0 + 1e-12)
        self.upper += shift[labels]
        self.lower -= self._group_reduce(shift, 0.0, "max")[None, :]
        cmax = float(centers.double().norm(dim=1).max())
        labels = labels.clone()
        cand = self._failing(self.lower, self.upper, self._err(None, cmax))
        if cand.numel():
            # Tighten the upper bound with the (float64, ~exact) own distance, then retest.
            step = max(1, CHUNK_BYTES // (16 * self.f))
            own = torch.cat([(self.x[c].double() - centers[labels[c]].double()).norm(dim=1) for c in cand.split(step)])
            self.upper[cand] = own * (1.0 + 1e-12)
            self.evaluations += cand.numel()
            sub = self._failing(self.lower[cand], self.upper[cand], self._err(cand, cmax))
            rows = cand[sub]
            if rows.numel():
                lab, up, lo = self._assign(rows, centers)
                labels[rows] = lab
                self.upper[rows] = up
                self.lower[rows] = lo
        return labels
