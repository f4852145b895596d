"""Fast mode on a CPU: the exact mode's iterations (same labels, iteration count and centres)
with far less work and no Python loop over clusters or tokens.

* Distances: `cached.CachedDistances` keeps the N×K `cdist` matrix and recomputes only the
  columns of centres that moved (in later Lloyd iterations few do), and, when few moved, only
  for the points that one of them could take over (the others keep float-error-safe lower
  bounds); labels follow the exact first-index argmin. When the cache would exceed
  `CACHE_BYTES`, `bounded.BoundedDistances` certifies labels with float-error-safe
  triangle-inequality bounds instead.
* Centres: `means.ClusterMeans` recomputes only the clusters whose membership changed, in torch's
  own `mean(0)` summation order (bitwise), or float64 sums where that order is not reproduced.

Why every skipped computation leaves the result unchanged:

1. Unmoved centre, column not recomputed: a `cdist` entry is a function of its point and its
   centre only (the GEMM row times the GEMM column; on x86/MKL the entry of a sub-product is
   bitwise the full product's, see `cached`), so the kept value is the value `cdist` returns.
   Moved centre, point skipped: its new `cdist` value is provably strictly larger than the
   point's own (rigorous GEMM error bound plus the triangle inequality, see `CachedDistances`),
   so it cannot change the argmin; the cache keeps a lower bound of it.
2. Labels updated without an argmin over every row: see the invariant in `CachedDistances`.
3. Unchanged membership, mean not recomputed: `x[labels == j].mean(0)` depends on the member
   rows in ascending order only, which did not change.
4. `allclose` evaluated on the moved centres only: an unmoved centre has `|new - old| = 0 <=
   atol + rtol·|old|`, so it cannot make `torch.allclose(new, centers)` false.
"""

from __future__ import annotations

import torch
from torch import Tensor

from uhrbat.compression.kmeans.bounded import BoundedDistances
from uhrbat.compression.kmeans.cached import CachedDistances
from uhrbat.compression.kmeans.common import KMeansResult
from uhrbat.compression.kmeans.exact import kmeans_exact
from uhrbat.compression.kmeans.means import ClusterMeans

__all__ = ["CACHE_BYTES", "kmeans_fast"]

# Largest persistent N×K distance cache kept; above it, the bound engine runs.
CACHE_BYTES = 1024 * 1024 * 1024


def kmeans_fast(
    x: Tensor, init: Tensor, iters: int, *, cache_bytes: int = CACHE_BYTES, emulate_mean_order: bool = True
) -> KMeansResult:
    """Same iterations as `exact.kmeans_exact`, with cached/bounded distances and partial updates.

    Args:
        x: `[N, F]` float points on the CPU.
        init: `[K]` int64 initial centre rows.
        iters: maximum number of assignment steps (>= 1).
        cache_bytes: largest N×K distance cache; above it the bound engine runs.
        emulate_mean_order: False forces float64 centre sums (what another ISA gets).
    """
    x = x.contiguous()
    n, _ = x.shape
    k = init.numel()
    if n <= 25 and k <= 25:
        # cdist takes its direct (non-matmul) path here; the problem is tiny anyway.
        return kmeans_exact(x, init, iters)
    engine: CachedDistances | BoundedDistances
    if n * k * x.element_size() <= cache_bytes:
        engine = CachedDistances(x, k)
    else:
        engine = BoundedDistances(x, k)
    means = ClusterMeans(x, k, emulate=emulate_mean_order)

    centers = x[init].clone()
    labels = engine.first(centers)
    labels_iter1 = labels.clone()
    means.recompute(labels, None)
    new = means.centers(centers)
    centers_iter1 = new.clone()
    converged = False
    it = 1
    while True:
        # Unchanged rows pass allclose trivially; test only the centres that moved.
        moved = (new != centers).any(dim=1).nonzero().squeeze(1)
        converged = torch.allclose(new[moved], centers[moved])
        if converged or it >= iters:
            centers = new
            break
        old_centers, centers = centers, new
        it += 1
        old_labels = labels
        labels = engine.step(centers, old_centers, moved, labels)
        changed = labels != old_labels
        if bool(changed.any()):
            affected = torch.cat([old_labels[changed], labels[changed]]).unique()
            means.recompute(labels, affected)
        new = means.centers(centers)

    return KMeansResult(
        labels=labels,
        init_indices=init,
        labels_iter1=labels_iter1,
        centers_iter1=centers_iter1,
        iterations=it,
        converged=converged,
        distance_evaluations=engine.evaluations,
        centers=centers,
        exact_means=means.exact,
    )
