"""Lloyd K-Means on tile-local clustering features (method §4.1, parity README step 8).

One algorithm (random init, assign by `cdist(...).argmin(1)`, move each centre to its members'
mean, stop when `torch.allclose(new, centers)`, labels from the last assignment), three
implementations behind one entry point, `kmeans(..., mode=...)`:

* ``exact`` (`exact.kmeans_exact`): the reference loop op for op, for bitwise reproduction.
* ``fast`` on a CPU (`fast.kmeans_fast`, the default): the same labels, iteration count and
  centres with far less work (distance cache with per-moved-column refresh, partial centre
  updates in torch's own `mean(0)` order).
* ``fast`` on an accelerator (`device.kmeans_device`): fixed-shape iterations, no host syncs.

Modules: `features` (what is clustered), `common` (result type, memory limits), `exact`,
`fast`, `cached` / `bounded` (the fast mode's two distance engines), `means` (torch-order
cluster means), `device`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from uhrbat.compression.kmeans.common import KMeansResult
from uhrbat.compression.kmeans.device import kmeans_device
from uhrbat.compression.kmeans.exact import kmeans_exact
from uhrbat.compression.kmeans.fast import kmeans_fast
from uhrbat.compression.kmeans.features import clustering_features, tile_coordinates
from uhrbat.compression.precision import autocast_off

__all__ = ["MODES", "KMeansResult", "clustering_features", "kmeans", "tile_coordinates"]

MODES = ("fast", "exact")


@autocast_off
def kmeans(
    features: Tensor,
    num_clusters: int,
    max_iters: int,
    generator: torch.Generator | None = None,
    mode: str = "fast",
    init_indices: Tensor | None = None,
) -> KMeansResult:
    """Lloyd K-Means with the reference's random init and stopping rule.

    Args:
        features: `[N, F]` float points (float32 in the reference).
        num_clusters: requested K; the run uses `K = min(max(1, num_clusters), N)`.
        max_iters: at most `max(1, max_iters)` assignment steps.
        generator: CPU generator for `torch.randperm(N)[:K]`; None = the global one, as in the
            reference (so `torch.manual_seed(s)` reproduces its draws).
        mode: "fast" (default, vectorised, far fewer distances) or "exact" (reference loop).
        init_indices: `[K]` int64 initial centre rows; skips the random draw (e.g. to inject
            the fixture's `init_idx`). Its length must equal K.

    Returns:
        A `KMeansResult`; labels come from the last assignment, like the reference.

    Exactness: "exact" gives the reference labels bitwise for bitwise-equal features. "fast"
    gives the same labels, iterations and centres as "exact" on x86 CPUs with float32/float64
    features up to ~1000 wide (`result.exact_means` True); otherwise the two can differ at
    float near-ties only. On an accelerator "fast" centres are float64 means (<= 1 ulp off).

    Memory (fast, CPU): an augmented copy of the features (N×(F+2)) and the N×K distance cache
    (float32: 200 MB at N=82944, K=600), or the bound engine when the cache exceeds 1 GiB.
    """
    if features.dim() != 2 or features.shape[0] < 1:
        raise ValueError(f"features must be [N >= 1, F], got shape {tuple(features.shape)}")
    if not features.is_floating_point():
        raise ValueError(f"features must be floating point, got {features.dtype}")
    # One cheap reduction first: a NaN / inf anywhere makes the sum non-finite.
    if not bool(torch.isfinite(features.sum())) and not bool(torch.isfinite(features).all()):
        raise ValueError("features contain NaN or inf")
    if mode not in MODES:
        raise ValueError(f"mode must be 'fast' or 'exact', got {mode!r}")
    n = features.shape[0]
    k = min(max(1, int(num_clusters)), n)
    if init_indices is None:
        # The reference draws on the CPU generator; draw there and move, whatever the device.
        init = torch.randperm(n, generator=generator)[:k].to(features.device)
    else:
        init = torch.as_tensor(init_indices).reshape(-1).to(features.device, torch.int64)
        if init.numel() != k:
            raise ValueError(f"init_indices has {init.numel()} entries, expected K = {k}")
        if int(init.min()) < 0 or int(init.max()) >= n:
            raise ValueError(f"init_indices must lie in [0, {n})")
    iters = max(1, int(max_iters))
    if mode == "exact":
        return kmeans_exact(features, init, iters)
    if features.device.type != "cpu":
        return kmeans_device(features, init, iters)
    return kmeans_fast(features, init, iters)
