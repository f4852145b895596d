"""What every K-Means implementation shares: the result type and the memory/BLAS limits."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

__all__ = ["CHUNK_BYTES", "MIN_GEMM_COLS", "MIN_GEMM_ROWS", "KMeansResult"]

# Upper bound, in bytes, on the temporaries of one chunk (gathered rows, distance blocks).
CHUNK_BYTES = 256 * 1024 * 1024
# BLAS (MKL) switches to other kernels, with another summation order, for products with very
# few rows (fewer than ~16) or a single column. Subsets are padded to at least these sizes so
# that (for feature widths up to ~1000) every entry is bitwise the entry of the full product;
# wider features can get other blockings anyway (entries then differ in the last bit only).
MIN_GEMM_ROWS = 64
MIN_GEMM_COLS = 16


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
