"""Fast mode on an accelerator (CUDA): fixed-shape Lloyd iterations without host syncs.

Every iteration is a chunked `torch.cdist(...).argmin(1)` (temporaries bounded by `CHUNK_BYTES`,
so N = 82,944 tokens x K = 3000 x 3586-wide features fit in ~1.5 GB besides the features) and a
deterministic centre update (float64 segment sums in sorted label order: no atomics).
Convergence (`allclose(new, centers)`, per iteration as in the reference) is a device flag that
freezes the state once set; the host reads it every `check_every` iterations only, so the loop
has no host syncs. Labels, iteration count and stop are the reference's; centres are float64
means rounded once, so they can differ from the device's `mean(0)` by one ulp, and labels after
many iterations can then differ at float near-ties. Runs on any device (tested on the CPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from uhrbat.compression.kmeans.common import CHUNK_BYTES, MIN_GEMM_ROWS, KMeansResult
from uhrbat.compression.kmeans.exact import kmeans_exact

__all__ = ["CHECK_EVERY", "DeviceState", "kmeans_device", "lloyd_steps"]

# Lloyd iterations between two host-side convergence checks on an accelerator: the only host
# sync of the loop. A run does at most this many - 1 frozen (no-op) iterations after it converged.
CHECK_EVERY = 8


@dataclass
class DeviceState:
    """Loop state kept on the device (0-d tensors for the flags and counts)."""

    centers: Tensor  # [K, F]
    labels: Tensor  # [N] int64, last assignment while active
    active: Tensor  # [] bool, not converged yet
    converged: Tensor  # [] bool
    iterations: Tensor  # [] int64, assignment steps run
    labels_iter1: Tensor | None = None
    centers_iter1: Tensor | None = None


def kmeans_device(x: Tensor, init: Tensor, iters: int, check_every: int = CHECK_EVERY) -> KMeansResult:
    """The reference's iterations as fixed-shape tensor ops (see the module docstring)."""
    n, f = x.shape
    k = init.numel()
    if n <= 25 and k <= 25:
        return kmeans_exact(x, init, iters)  # cdist's direct (non-matmul) path, as in exact mode
    x = x.contiguous()
    dev = x.device
    state = DeviceState(
        centers=x[init].clone(),
        labels=torch.zeros(n, dtype=torch.int64, device=dev),
        active=torch.ones((), dtype=torch.bool, device=dev),
        converged=torch.zeros((), dtype=torch.bool, device=dev),
        iterations=torch.zeros((), dtype=torch.int64, device=dev),
    )
    done = 0
    while done < iters:
        steps = min(max(1, check_every), iters - done)
        lloyd_steps(x, state, steps)
        done += steps
        if not bool(state.active):  # the loop's only host sync, once per block
            break
    assert state.labels_iter1 is not None and state.centers_iter1 is not None
    it = int(state.iterations)
    return KMeansResult(
        labels=state.labels,
        init_indices=init,
        labels_iter1=state.labels_iter1,
        centers_iter1=state.centers_iter1,
        iterations=it,
        converged=bool(state.converged),
        distance_evaluations=it * n * k,
        centers=state.centers,
        exact_means=False,
    )


def lloyd_steps(x: Tensor, state: DeviceState, steps: int) -> None:
    """`steps` masked Lloyd iterations on `state` (no host syncs; a converged state is frozen)."""
    for _ in range(steps):
        labels = _assign(x, state.centers)
        new = _update(x, labels, state.centers)
        if state.labels_iter1 is None:
            state.labels_iter1, state.centers_iter1 = labels.clone(), new.clone()
        # torch.allclose(new, centers): |new - centers| <= atol + rtol * |centers|
        close = torch.all((new - state.centers).abs() <= 1e-8 + 1e-5 * state.centers.abs())
        a = state.active
        state.labels = torch.where(a, labels, state.labels)
        state.centers = torch.where(a, new, state.centers)
        state.iterations = state.iterations + a.long()
        state.converged = state.converged | (a & close)
        state.active = a & ~close


def _assign(x: Tensor, centers: Tensor) -> Tensor:
    """`[N]` `cdist(x, centers).argmin(1)`, by row chunks (the matmul form, as `torch.cdist`
    uses for these sizes)."""
    n, f = x.shape
    k = centers.shape[0]
    per_row = 2 * (f + 2 + k) * x.element_size()
    chunk = max(MIN_GEMM_ROWS, CHUNK_BYTES // per_row)
    labels = torch.empty(n, dtype=torch.int64, device=x.device)
    for start in range(0, n, chunk):
        d = torch.cdist(x[start : start + chunk], centers, p=2.0, compute_mode="use_mm_for_euclid_dist")
        labels[start : start + chunk] = d.argmin(dim=1)
    return labels


def _update(x: Tensor, labels: Tensor, centers: Tensor) -> Tensor:
    """`[K, F]` member means (the old centre for an empty cluster), deterministic: members are
    sorted by cluster (stable), summed by a float64 prefix sum and rounded once."""
    n, f = x.shape
    k = centers.shape[0]
    counts = torch.zeros(k, dtype=torch.int64, device=x.device).index_add_(0, labels, torch.ones_like(labels))
    order = torch.sort(labels, stable=True).indices
    ends = torch.cumsum(counts, 0)
    starts = ends - counts
    denom = counts.clamp_min(1).to(torch.float64)[:, None]
    new = torch.empty_like(centers)
    width = max(1, CHUNK_BYTES // (3 * 8 * n))  # gathered block + float64 copy + prefix sums
    for c0 in range(0, f, width):
        block = x[order, c0 : c0 + width].double()
        prefix = torch.cat([block.new_zeros(1, block.shape[1]), torch.cumsum(block, 0)])
        new[:, c0 : c0 + width] = ((prefix[ends] - prefix[starts]) / denom).to(x.dtype)
    return torch.where((counts > 0)[:, None], new, centers)
