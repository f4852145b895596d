"""Exact mode: the reference's Lloyd loop, op for op (parity README step 8).

A full `torch.cdist(...).argmin(1)` and one `features[labels == j].mean(0)` per cluster in every
iteration; `torch.allclose(new, centers)` stops it; the labels come from the last assignment.
O(K·N·F) per iteration plus a Python loop over clusters: kept for bitwise reproduction of the
reference, and as the yardstick the fast mode is tested against.
"""

from __future__ import annotations

import torch
from torch import Tensor

from uhrbat.compression.kmeans.common import KMeansResult

__all__ = ["kmeans_exact"]


def kmeans_exact(x: Tensor, init: Tensor, iters: int) -> KMeansResult:
    """Lloyd from the centres `x[init]` for at most `iters` assignments, as the reference runs it.

    Args:
        x: `[N, F]` float points.
        init: `[K]` int64 initial centre rows.
        iters: maximum number of assignment steps (>= 1).
    """
    n, k = x.shape[0], init.numel()
    centers = x[init]
    labels = labels_iter1 = centers_iter1 = None
    converged = False
    it = 0
    for it in range(1, iters + 1):
        labels = torch.cdist(x, centers, p=2.0).argmin(dim=1)
        new = centers.clone()
        for j in range(k):
            member = labels == j
            if bool(member.any()):
                new[j] = x[member].mean(0)
        if it == 1:
            labels_iter1, centers_iter1 = labels.clone(), new.clone()
        converged = torch.allclose(new, centers)
        centers = new
        if converged:
            break
    assert labels is not None and labels_iter1 is not None and centers_iter1 is not None
    return KMeansResult(
        labels=labels,
        init_indices=init,
        labels_iter1=labels_iter1,
        centers_iter1=centers_iter1,
        iterations=it,
        converged=converged,
        distance_evaluations=it * n * k,
        centers=centers,
    )
