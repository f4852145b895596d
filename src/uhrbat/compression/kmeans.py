"""Lloyd K-Means on tile-local clustering features (method §4.1, parity README step 8).

Two implementations of one algorithm (random init, assign by `cdist(...).argmin(1)`, move each
centre to its members' mean, stop when `torch.allclose(new, centers)`, labels from the last
assignment):

* ``mode="exact"`` is the reference loop, op for op: a full ``torch.cdist`` and one
  ``features[labels == j].mean(0)`` per cluster in every iteration. O(K·N·F) per iteration plus
  a Python loop over clusters; kept for bitwise reproduction.
* ``mode="fast"`` (default) runs the same iterations with much less work and no Python loop
  over clusters or tokens, and gives the same labels, iteration count and centres:

  - Distances: the matmul form of ``cdist`` (``[-2x, |x|², 1] · [c, 1, |c|²]``, clamp, sqrt) is
    evaluated on the same augmented rows. The first assignment is that very GEMM (bitwise
    ``torch.cdist``); afterwards the N×K matrix is kept (transposed, ``[K, N]``) and only the
    columns of centres that moved are recomputed; in later Lloyd iterations few centres move.
    Labels follow the exact first-index argmin of that matrix without rescanning rows (see
    `_CachedDistances`). For feature widths up to ~1000 (tested: 66, 130, 516) BLAS gives the
    column blocks bitwise the entries of the full product on x86/MKL; for wider features the
    blockings can differ in the last bit, so labels can then differ from plain Lloyd at exact
    float near-ties only. When the N×K cache would exceed ``_CACHE_BYTES``, a bound engine is
    used instead (Hamerly/Yinyang-style triangle-inequality bounds with a rigorous float-error
    margin; only rows that fail the test get all their distances recomputed).
  - Centres: only clusters whose membership changed are recomputed, in one vectorised pass
    that follows the summation order of torch's CPU ``mean(0)`` (its cascade sum), so centres
    are bitwise the reference ones. A one-off self-check per feature width verifies this on the
    running machine; if it fails (another ISA, GPU, dtype), centres are float64 sums cast to the
    feature dtype (<= 1 ulp off; far-out iterations may then differ at float near-ties, as the
    parity README reports for a vectorised mean: 98.9 % equal labels at 4032).

  On an accelerator (features on CUDA), ``mode="fast"`` runs `_kmeans_device` instead: the same
  iterations as fixed-shape tensor ops with bounded temporaries and no host syncs inside
  iterations (the stop flag is read every `_DEVICE_CHECK_EVERY` iterations); see its docstring.
  The CPU path above is unchanged by it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from uhrbat.compression.precision import autocast_off

__all__ = ["KMeansResult", "clustering_features", "kmeans", "tile_coordinates"]

# Upper bound, in bytes, on the temporaries of one chunk (gathered rows, distance blocks).
_CHUNK_BYTES = 256 * 1024 * 1024
# Chunk of a column refresh in the cached engine: small enough that the clamp/sqrt/min passes
# after each GEMM block run on cache-resident data (about 10 % faster than 256 MB chunks at
# K=2000, N=82944 on one thread; the GEMM rows, hence the values, are unchanged).
_STEP_CHUNK_BYTES = 32 * 1024 * 1024
# Largest persistent N×K distance cache the fast mode keeps; above it, the bound engine runs.
_CACHE_BYTES = 1024 * 1024 * 1024
# BLAS (MKL) switches to other kernels, with another summation order, for matrices with very
# few rows (fewer than ~16) or a single column. Subsets are padded to at least these sizes so
# that (for feature widths up to ~1000) every entry is bitwise the entry of the full product;
# wider features can get other blockings anyway (entries then differ in the last bit only).
_MIN_GEMM_ROWS = 64
_MIN_GEMM_COLS = 16
# Number of per-point lower bounds (centre groups) kept by the bound engine.
_MAX_BOUND_GROUPS = 64
# torch's cascade sum uses 16-row levels for reductions of up to 2**19 rows.
_CASCADE_MAX_ROWS = 1 << 19


@dataclass
class KMeansResult:
    """Outcome of one K-Means run.

    Attributes:
        labels: `[N]` int64 cluster of every point, from the **last assignment** (not
            recomputed after the final centre update, like the reference).
        init_indices: `[K]` int64 rows of `features` used as initial centres.
        labels_iter1: `[N]` int64 labels of the first assignment (from the initial centres).
        centers_iter1: `[K, F]` centres after the first update.
        iterations: number of assignment steps run (1 ... max(1, max_iters)).
        converged: True when the loop stopped because `allclose(new, centers)`.
        distance_evaluations: point-to-centre distances computed (a full row counts K).
            Plain Lloyd does `iterations * N * K`.
        centers: `[K, F]` centres after the last update.
        exact_means: True when every centre update reproduced torch's `mean(0)` bitwise.
    """

    labels: Tensor
    init_indices: Tensor
    labels_iter1: Tensor
    centers_iter1: Tensor
    iterations: int
    converged: bool
    distance_evaluations: int = 0
    centers: Tensor | None = None
    exact_means: bool = True

    @property
    def num_clusters(self) -> int:
        """K, the number of centres (some clusters may be empty)."""
        return int(self.init_indices.numel())


def tile_coordinates(tokens_per_side: int = 24, device: torch.device | str | None = None) -> Tensor:
    """`[t*t, 2]` float32 tile-local token coordinates in [0, 1], row-major token order.

    Column 0 is the token's column / (t - 1), column 1 its row / (t - 1): the reference's
    `(x, y)`. Checked bitwise against the coordinate columns of the fixture's
    `kmeans.*.centers_iter1` (swapping them leaves distances and labels unchanged, not centres).
    """
    if tokens_per_side < 1:
        raise ValueError(f"tokens_per_side must be >= 1, got {tokens_per_side}")
    grid = torch.arange(tokens_per_side, device=device)
    rows, cols = torch.meshgrid(grid, grid, indexing="ij")
    # int64 / int -> float32 true division: the same rounding as the reference's `/ 23`.
    coords = torch.stack([cols, rows], dim=-1).reshape(-1, 2) / max(tokens_per_side - 1, 1)
    return coords.to(torch.float32)


@autocast_off
def clustering_features(
    embeds: Tensor,
    num_tiles: int,
    feat_scale: float = 1.0,
    coord_scale: float = 0.05,
    tokens_per_side: int = 24,
) -> Tensor:
    """Features K-Means clusters on: normalised embedding plus tile-local (x, y).

    Args:
        embeds: `[N, D]` token embeddings, tile-major then row-major, N = num_tiles * t².
        num_tiles: number of tiles T at this scale.
        feat_scale: weight of the L2-normalised embedding.
        coord_scale: weight of the coordinates (both in [0, 1] before scaling).
        tokens_per_side: t, tokens per tile side (24 for CLIP-336/14).

    Returns:
        `[N, D + 2]` float32 `cat([feat_scale * normalize(embeds), coord_scale * coords])`.
        Bitwise equal to the reference for float32 input. (The reference normalises in the
        embedding dtype, e.g. bf16 on GPU; this normalises in float32, which is more accurate.)
    """
    if embeds.dim() != 2:
        raise ValueError(f"embeds must be [N, D], got shape {tuple(embeds.shape)}")
    per_tile = tokens_per_side * tokens_per_side
    if num_tiles < 1 or embeds.shape[0] != num_tiles * per_tile:
        raise ValueError(
            f"embeds has {embeds.shape[0]} rows, expected num_tiles * {per_tile} = {num_tiles} * {per_tile}"
        )
    feats = feat_scale * F.normalize(embeds.float(), dim=1)
    coords = coord_scale * tile_coordinates(tokens_per_side, embeds.device).repeat(num_tiles, 1)
    return torch.cat([feats, coords], dim=1)


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
    float near-ties only (see the module docstring).

    Memory (fast): an augmented copy of the features (N×(F+2)) and the N×K distance cache
    (float32: 200 MB at N=82944, K=600), or the bound engine when the cache exceeds 1 GiB.
    """
    if features.dim() != 2 or features.shape[0] < 1:
        raise ValueError(f"features must be [N >= 1, F], got shape {tuple(features.shape)}")
    if not features.is_floating_point():
        raise ValueError(f"features must be floating point, got {features.dtype}")
    # One cheap reduction first: a NaN / inf anywhere makes the sum non-finite.
    if not bool(torch.isfinite(features.sum())) and not bool(torch.isfinite(features).all()):
        raise ValueError("features contain NaN or inf")
    if mode not in ("fast", "exact"):
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
        return _kmeans_exact(features, init, iters)
    if features.device.type != "cpu":
        return _kmeans_device(features, init, iters)
    return _kmeans_fast(features, init, iters)


# --------------------------------------------------------------------------------------------
# exact mode


def _kmeans_exact(x: Tensor, init: Tensor, iters: int) -> KMeansResult:
    """The reference loop, op for op (see the parity README step 8)."""
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


# --------------------------------------------------------------------------------------------
# fast mode on an accelerator (CUDA): fixed-shape Lloyd without host syncs


# Lloyd iterations between two host-side convergence checks on an accelerator: the only host
# sync of the loop. A run does at most this many - 1 frozen (no-op) iterations after it converged.
_DEVICE_CHECK_EVERY = 8


@dataclass
class _DeviceState:
    """Loop state kept on the device (0-d tensors for the flags and counts)."""

    centers: Tensor  # [K, F]
    labels: Tensor  # [N] int64, last assignment while active
    active: Tensor  # [] bool, not converged yet
    converged: Tensor  # [] bool
    iterations: Tensor  # [] int64, assignment steps run
    labels_iter1: Tensor | None = None
    centers_iter1: Tensor | None = None


def _kmeans_device(x: Tensor, init: Tensor, iters: int, check_every: int = _DEVICE_CHECK_EVERY) -> KMeansResult:
    """The reference's iterations as fixed-shape tensor ops (for CUDA; runs on any device).

    Every iteration is a chunked `torch.cdist(...).argmin(1)` (temporaries bounded by
    `_CHUNK_BYTES`, so N = 82,944 tokens x K = 3000 x 3586-wide features fit in ~1.5 GB besides
    the features) and a deterministic centre update (float64 segment sums in sorted label order:
    no atomics). Convergence (`allclose(new, centers)`, per iteration as in the reference) is a
    device flag that freezes the state once set; the host reads it every `check_every`
    iterations only, so the loop has no host syncs. Labels, iteration count and stop are the
    reference's; centres are float64 means rounded once, so they can differ from torch's
    `mean(0)` by one ulp, and labels after many iterations can then differ at float near-ties.
    """
    n, f = x.shape
    k = init.numel()
    if n <= 25 and k <= 25:
        return _kmeans_exact(x, init, iters)  # cdist's direct (non-matmul) path, as in exact mode
    x = x.contiguous()
    dev = x.device
    state = _DeviceState(
        centers=x[init].clone(),
        labels=torch.zeros(n, dtype=torch.int64, device=dev),
        active=torch.ones((), dtype=torch.bool, device=dev),
        converged=torch.zeros((), dtype=torch.bool, device=dev),
        iterations=torch.zeros((), dtype=torch.int64, device=dev),
    )
    done = 0
    while done < iters:
        steps = min(max(1, check_every), iters - done)
        _device_lloyd_steps(x, state, steps)
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


def _device_lloyd_steps(x: Tensor, state: _DeviceState, steps: int) -> None:
    """`steps` masked Lloyd iterations on `state` (no host syncs; a converged state is frozen)."""
    for _ in range(steps):
        labels = _device_assign(x, state.centers)
        new = _device_update(x, labels, state.centers)
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


def _device_assign(x: Tensor, centers: Tensor) -> Tensor:
    """`[N]` `cdist(x, centers).argmin(1)`, by row chunks (the matmul form, as `torch.cdist`
    uses for these sizes)."""
    n, f = x.shape
    k = centers.shape[0]
    per_row = 2 * (f + 2 + k) * x.element_size()
    chunk = max(_MIN_GEMM_ROWS, _CHUNK_BYTES // per_row)
    labels = torch.empty(n, dtype=torch.int64, device=x.device)
    for start in range(0, n, chunk):
        d = torch.cdist(x[start : start + chunk], centers, p=2.0, compute_mode="use_mm_for_euclid_dist")
        labels[start : start + chunk] = d.argmin(dim=1)
    return labels


def _device_update(x: Tensor, labels: Tensor, centers: Tensor) -> Tensor:
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
    width = max(1, _CHUNK_BYTES // (3 * 8 * n))  # gathered block + float64 copy + prefix sums
    for c0 in range(0, f, width):
        block = x[order, c0 : c0 + width].double()
        prefix = torch.cat([block.new_zeros(1, block.shape[1]), torch.cumsum(block, 0)])
        new[:, c0 : c0 + width] = ((prefix[ends] - prefix[starts]) / denom).to(x.dtype)
    return torch.where((counts > 0)[:, None], new, centers)


# --------------------------------------------------------------------------------------------
# fast mode: driver


def _kmeans_fast(x: Tensor, init: Tensor, iters: int) -> KMeansResult:
    """Same iterations as `_kmeans_exact`, with cached/bounded distances and partial updates."""
    x = x.contiguous()
    n, _ = x.shape
    k = init.numel()
    if n <= 25 and k <= 25:
        # cdist takes its direct (non-matmul) path here; the problem is tiny anyway.
        return _kmeans_exact(x, init, iters)
    engine: _CachedDistances | _BoundedDistances
    if n * k * x.element_size() <= _CACHE_BYTES:
        engine = _CachedDistances(x, k)
    else:
        engine = _BoundedDistances(x, k)
    means = _ClusterMeans(x, k)

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


# --------------------------------------------------------------------------------------------
# fast mode: distances kept in an N×K cache, recomputed per moved column


class _CachedDistances:
    """`cdist` matrix kept across iterations; only the columns of moved centres are redone.

    `torch.cdist` (matmul path) computes `clamp_min(x_ @ y_.mT, 1e-30).sqrt()` with
    `x_ = cat([-2 x, |x|², 1])` and `y_ = cat([c, 1, |c|²])`. `x_` does not depend on the
    centres, so it is built once. A full refresh is that very GEMM (same shapes, so bitwise
    `torch.cdist`); a column refresh is the same formula on a column subset. The cache is stored
    transposed, `[K, N]`, so that refreshing a few columns writes a few contiguous rows.

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
        return max(_MIN_GEMM_ROWS, _STEP_CHUNK_BYTES // per_row)

    def first(self, centers: Tensor) -> Tensor:
        """Fill the whole cache; `[N]` argmin labels."""
        return self._full(centers)

    def _full(self, centers: Tensor, previous: Tensor | None = None) -> Tensor:
        """Recompute every entry; `previous` = the labels before (None on the first call)."""
        ya = self._augment(centers)
        self.evaluations += self.n * self.k
        if previous is None and self.n * self.k * self.dist_t.element_size() <= 2 * _CHUNK_BYTES:
            # The first refresh is `torch.cdist`'s own GEMM, same shapes, one call: bitwise
            # torch.cdist at any feature width, so labels_iter1 is exact.
            block = torch.matmul(self.xa, ya.mT).clamp_min_(1e-30).sqrt_()
            own, labels = block.min(dim=1)  # first index of the minimum, like argmin
            at = labels[:, None]
            block.scatter_(1, at, math.inf)
            self.second.copy_(block.amin(dim=1))
            block.scatter_(1, at, own[:, None])
            self.dist_t.copy_(block.T)
            return labels
        # Otherwise the transposed product straight into the [K, N] cache (bitwise
        # torch.cdist for feature widths up to ~1000, see the module docstring).
        torch.matmul(ya, self.xa.mT, out=self.dist_t)
        d = self.dist_t.clamp_min_(1e-30).sqrt_()
        if previous is None:
            own, labels = d.min(dim=0)  # first index of the minimum, like argmin
            at = labels[None, :]
            d.scatter_(0, at, math.inf)
            self.second.copy_(d.amin(dim=0))
            d.scatter_(0, at, own[None, :])
            return labels
        # A min with indices along dim 0 is slow and most points keep their label: one pass
        # of values over the other entries shows where the previous label is still the
        # unique minimum; only the other points get an indexed min.
        at = previous[None, :]
        own = d.gather(0, at).squeeze(0)
        d.scatter_(0, at, math.inf)
        rest = d.amin(dim=0)
        d.scatter_(0, at, own[None, :])
        labels = previous.clone()
        self.second.copy_(rest)
        redo = (own >= rest).nonzero().squeeze(1)
        if redo.numel():
            self._rescan(redo, labels)
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
        if m < _MIN_GEMM_COLS and self.k > m:
            unmoved = torch.ones(self.k, dtype=torch.bool, device=dev)
            unmoved[moved] = False
            cols = torch.cat([moved, unmoved.nonzero().squeeze(1)[: _MIN_GEMM_COLS - m]])
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
            if r < min(self.n, _MIN_GEMM_ROWS):
                xs = torch.cat([xs, self.xa[: _MIN_GEMM_ROWS - r]])
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


# --------------------------------------------------------------------------------------------
# fast mode: bound-based engine (used when the N×K cache would be too large)


class _BoundedDistances:
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
        self.groups = max(1, min(k, _MAX_BOUND_GROUPS))
        self.group_size = -(-k // self.groups)
        self.unit = torch.finfo(x.dtype).eps / 2
        self.err_coef = 4.0 * (self.f + 4) * self.unit
        step = max(1, _CHUNK_BYTES // (8 * self.f))
        self.xnorm = torch.cat([c.double().norm(dim=1) for c in x.split(step)])
        per_row = self.f * x.element_size() + 3 * k * 4 + 16 * self.groups
        self.chunk = max(_MIN_GEMM_ROWS, _CHUNK_BYTES // per_row)
        self.min_rows = min(self.n, _MIN_GEMM_ROWS)
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
            step = max(1, _CHUNK_BYTES // (16 * self.f))
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


# --------------------------------------------------------------------------------------------
# fast mode: centres


class _ClusterMeans:
    """Per-cluster means, recomputed only for the clusters whose membership changed.

    Members are gathered in ascending position order (as `x[labels == j]` does) and summed in
    one vectorised pass that follows torch's CPU cascade-sum order, so each mean is bitwise
    `x[labels == j].mean(0)`. Falls back to float64 sums when the emulation self-check fails.
    """

    def __init__(self, x: Tensor, k: int) -> None:
        self.x = x
        self.k = k
        self.lanes = _mean_emulation_lanes(x.shape[1], x.dtype, x.device)
        self.exact = self.lanes is not None
        self.counts = torch.zeros(k, dtype=torch.int64, device=x.device)
        self.means = torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device)

    def recompute(self, labels: Tensor, clusters: Tensor | None) -> None:
        """Refresh counts/means of `clusters` (None = all) from `labels`."""
        if clusters is None:
            rows = torch.arange(labels.numel(), device=labels.device)
            self.counts.zero_()
        else:
            pick = torch.zeros(self.k, dtype=torch.bool, device=labels.device)
            pick[clusters] = True
            rows = pick[labels].nonzero().squeeze(1)
            self.counts[clusters] = 0  # clusters that just emptied stay at 0
        lab = labels[rows]
        order = torch.sort(lab, stable=True).indices  # by cluster, then ascending position
        rows, lab = rows[order], lab[order]
        ids, counts = torch.unique_consecutive(lab, return_counts=True)
        self.counts[ids] = counts
        # Batches of whole clusters keep the gathered rows within the chunk budget.
        budget = max(1, _CHUNK_BYTES // (4 * self.x.shape[1] * self.x.element_size()))
        bounds = torch.cumsum(counts, 0).tolist()
        first, row0 = 0, 0
        while first < ids.numel():
            last = first
            while last + 1 < ids.numel() and bounds[last + 1] - row0 <= budget:
                last += 1
            row1 = bounds[last]
            self._batch(rows[row0:row1], ids[first : last + 1], counts[first : last + 1])
            first, row0 = last + 1, row1

    def _batch(self, rows: Tensor, ids: Tensor, counts: Tensor) -> None:
        nseg = ids.numel()
        seg = _segment_ids(counts, rows.numel())
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(rows.numel(), device=rows.device) - starts[seg]
        if self.lanes is not None and int(counts.max()) <= _CASCADE_MAX_ROWS:
            sums = _torch_like_sums(self.x, rows, seg, rank, counts, self.lanes)
            self.means[ids] = sums / counts.to(self.x.dtype)[:, None]
        else:
            self.exact = False
            sums = torch.zeros(nseg, self.x.shape[1], dtype=torch.float64, device=rows.device)
            sums.index_add_(0, seg, self.x[rows].double())
            self.means[ids] = (sums / counts.double()[:, None]).to(self.x.dtype)

    def centers(self, old: Tensor) -> Tensor:
        """`[K, F]` new centres: member means, or the old centre for an empty cluster."""
        return torch.where((self.counts > 0)[:, None], self.means, old)


def _segment_ids(counts: Tensor, total: int) -> Tensor:
    """`[total]` segment index of every item, for items laid out segment after segment
    (`counts` >= 1 each); a cumsum of start markers, cheaper than repeat_interleave."""
    marks = torch.zeros(total, dtype=torch.int64, device=counts.device)
    if counts.numel() > 1:
        marks[torch.cumsum(counts, 0)[:-1]] = 1
    return torch.cumsum(marks, 0)


def _run_sums(
    src: Tensor,
    rows: Tensor | None,
    seg: Tensor,
    rank: Tensor,
    counts: Tensor,
    group: int,
    seq_sum: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One accumulator level of torch's cascade sum.

    Item t is `src[rows[t]]` (or `src[t]` when `rows` is None). Each segment's items (ordered
    by `rank`) are cut into runs of `group`; every run is summed sequentially starting from 0.
    Returns `(full, full_seg, full_rank, full_counts, residue)`: the sums of the complete runs
    (they are pushed to the next level, in order), their segment, rank and count per segment,
    and each segment's incomplete last run `[nseg, C]`.
    """
    dev = src.device
    nfull = counts // group
    slots = nfull + 1  # the complete runs, then the (possibly empty) residue
    base = torch.cumsum(slots, 0) - slots
    total = int(slots.sum())
    dest = (base[seg] + rank // group) * group + rank % group
    # Gather straight into the padded [slot, position] layout; unused positions read row 0
    # and are zeroed (x + 0 == x, so zero padding leaves every sequential sum unchanged).
    source = torch.zeros(total * group, dtype=torch.int64, device=dev)
    source[dest] = torch.arange(rank.numel(), device=dev) if rows is None else rows
    padded = src.index_select(0, source)
    unused = torch.ones(total * group, dtype=torch.bool, device=dev)
    unused[dest] = False
    padded.index_fill_(0, unused.nonzero().squeeze(1), 0.0)
    padded = padded.view(total, group, src.shape[1])
    if seq_sum and group == 16:
        # torch's outer sum of exactly 16 rows (column blocks of 4 lanes) is the sequential
        # sum from 0 (one cascade level); checked by the emulation self-test.
        acc = padded.sum(dim=1)
    else:
        acc = src.new_zeros(total, src.shape[1])
        for p in range(group):
            acc += padded[:, p]
    slot_seg = _segment_ids(slots, total)
    slot_rank = torch.arange(total, device=dev) - base[slot_seg]
    is_full = slot_rank < nfull[slot_seg]
    return acc[is_full], slot_seg[is_full], slot_rank[is_full], nfull, acc[base + nfull]


def _cascade_sums(
    src: Tensor, rows: Tensor | None, seg: Tensor, rank: Tensor, counts: Tensor, seq_sum: bool = False
) -> Tensor:
    """Per-segment sums in the order of ATen's `multi_row_sum` (4 levels of 16, <= 2**19 rows):
    rows go into acc0; every 16 rows acc0 is pushed into acc1, every 256 acc1 into acc2, every
    4096 acc2 into acc3; the result is ((acc0 + acc1) + acc2) + acc3."""
    out = None
    for _level in range(3):
        src, seg, rank, counts, residue = _run_sums(src, rows, seg, rank, counts, 16, seq_sum)
        rows = None
        out = residue if out is None else out + residue
        if src.shape[0] == 0:  # nothing pushed up: the higher accumulators stay 0
            return out
    longest = int(counts.max())
    return out + _run_sums(src, None, seg, rank, counts, longest + 1)[4]


def _torch_like_sums(src: Tensor, rows: Tensor, seg: Tensor, rank: Tensor, counts: Tensor, lanes: int) -> Tensor:
    """Per-segment column sums bitwise equal to torch's CPU `x[rows_s].sum(0)` per segment s
    (segment s = the items with seg == s, contiguous and in order in `rows`; `counts` >= 1).

    ATen's outer reduction sums column blocks of `4 * lanes` with `multi_row_sum` (cascade),
    and the remaining columns with `row_sum` (4 interleaved cascades, the leftover rows added
    to the first, then the other three added in order).
    """
    nseg = counts.numel()
    c = src.shape[1]
    wide = (c // (4 * lanes)) * (4 * lanes)
    out = src.new_empty(nseg, c)
    if wide:
        out[:, :wide] = _cascade_sums(src[:, :wide], rows, seg, rank, counts, seq_sum=True)
    if wide < c:
        rest = src[rows, wide:]
        quads = counts // 4
        inside = rank < 4 * quads[seg]
        sseg = seg[inside] * 4 + rank[inside] % 4
        scounts = quads[:, None].expand(nseg, 4).reshape(-1)
        if bool(inside.any()):
            order = torch.sort(sseg, stable=True).indices  # streams contiguous, rows in order
            parts = _cascade_sums(rest[inside][order], None, sseg[order], (rank[inside] // 4)[order], scounts)
        else:
            parts = rest.new_zeros(nseg * 4, c - wide)
        parts = parts.view(nseg, 4, c - wide)
        acc = parts[:, 0]
        left = ~inside
        lrank = rank[left] - 4 * quads[seg[left]]
        lpad = rest.new_zeros(nseg, 3, c - wide)
        lpad[seg[left], lrank] = rest[left]
        for p in range(3):
            acc = acc + lpad[:, p]
        out[:, wide:] = ((acc + parts[:, 1]) + parts[:, 2]) + parts[:, 3]
    return out


_EMULATION_CACHE: dict[tuple, int | None] = {}


def _mean_emulation_lanes(width: int, dtype: torch.dtype, device: torch.device) -> int | None:
    """SIMD lane count for which `_torch_like_sums` reproduces `x[rows].mean(0)` bitwise here,
    or None. Checked once per (width, dtype, device type, threads) on random clusters."""
    if device.type != "cpu" or dtype not in (torch.float32, torch.float64):
        return None
    key = (width, dtype, device.type, torch.get_num_threads(), torch.backends.cpu.get_cpu_capability())
    if key in _EMULATION_CACHE:
        return _EMULATION_CACHE[key]
    gen = torch.Generator().manual_seed(12345)
    sizes = torch.tensor([1, 2, 3, 5, 15, 16, 17, 33, 255, 257, 300, 4099])
    vals = torch.randn(int(sizes.sum()), width, generator=gen, dtype=dtype)
    seg = _segment_ids(sizes, vals.shape[0])
    rank = torch.arange(vals.shape[0]) - (torch.cumsum(sizes, 0) - sizes)[seg]
    want = torch.stack([part.mean(0) for part in vals.split(sizes.tolist())])
    found = None
    # 512-bit (AVX512) and 256-bit (AVX2 / default) vectors, float32 first.
    for lanes in (16, 8, 4, 32, 2):
        got = _torch_like_sums(vals, torch.arange(vals.shape[0]), seg, rank, sizes, lanes)
        got = got / sizes.to(dtype)[:, None]
        if torch.equal(got, want):
            found = lanes
            break
    _EMULATION_CACHE[key] = found
    return found
