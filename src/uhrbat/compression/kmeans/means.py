"""Per-cluster means bitwise equal to torch's CPU `x[labels == j].mean(0)`, without a Python
loop over clusters.

`x[rows].mean(0)` on a CPU sums the rows with ATen's outer reduction: column blocks of
`4 * lanes` (the SIMD width) go through `multi_row_sum`, a cascade of accumulators of 16 rows;
the remaining columns go through `row_sum` (4 interleaved cascades). `torch_like_sums`
reproduces that order for many segments at once, so the fast mode's centres are bitwise the
exact mode's. Which lane count this machine uses is found once per (width, dtype, threads, ISA)
by a self-check against `mean(0)` itself (`mean_emulation_lanes`, a cached pure function);
where no lane count reproduces it (another ISA, an accelerator), `ClusterMeans` uses float64
sums rounded once (<= 1 ulp from `mean(0)`) and says so (`exact` False).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from uhrbat.compression.kmeans.common import CHUNK_BYTES

__all__ = ["ClusterMeans", "mean_emulation_lanes", "segment_ids", "torch_like_sums"]

# torch's cascade sum uses 16-row levels for reductions of up to 2**19 rows.
CASCADE_MAX_ROWS = 1 << 19


class ClusterMeans:
    """Per-cluster means, recomputed only for the clusters whose membership changed.

    Members are taken in ascending position order (as `x[labels == j]` does) and summed, for
    all changed clusters at once, in torch's CPU cascade-sum order, so each mean is bitwise
    `x[labels == j].mean(0)`. Falls back to float64 sums when the emulation self-check fails.
    """

    def __init__(self, x: Tensor, k: int, emulate: bool = True) -> None:
        """`x`: `[N, F]` points; `k`: clusters; `emulate` False forces the float64 sums."""
        self.x = x
        self.k = k
        self.lanes = mean_emulation_lanes(x.shape[1], x.dtype, x.device) if emulate else None
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
        seg = segment_ids(counts, rows.numel())
        if self.lanes is not None and int(counts.max()) <= CASCADE_MAX_ROWS:
            # One embedding_bag pass per cascade level: no gathered copy of the member rows.
            rank = torch.arange(rows.numel(), device=rows.device) - (torch.cumsum(counts, 0) - counts)[seg]
            sums = torch_like_sums(self.x, rows, seg, rank, counts, self.lanes)
            self.means[ids] = sums / counts.to(self.x.dtype)[:, None]
            return
        self.exact = False
        # float64 sums of the gathered rows, by batches of whole clusters (a batch holds the
        # clusters that start in one window of `budget` rows) to bound the gathered copy.
        budget = max(1, CHUNK_BYTES // (2 * self.x.shape[1] * 8))
        _, per_batch = torch.unique_consecutive((torch.cumsum(counts, 0) - counts) // budget, return_counts=True)
        row0 = seg0 = 0
        for nseg in per_batch.tolist():
            row1 = row0 + int(counts[seg0 : seg0 + nseg].sum())
            sums = torch.zeros(nseg, self.x.shape[1], dtype=torch.float64, device=rows.device)
            sums.index_add_(0, seg[row0:row1] - seg0, self.x[rows[row0:row1]].double())
            cnt = counts[seg0 : seg0 + nseg].double()[:, None]
            self.means[ids[seg0 : seg0 + nseg]] = (sums / cnt).to(self.x.dtype)
            row0, seg0 = row1, seg0 + nseg

    def centers(self, old: Tensor) -> Tensor:
        """`[K, F]` new centres: member means, or the old centre for an empty cluster."""
        return torch.where((self.counts > 0)[:, None], self.means, old)


def segment_ids(counts: Tensor, total: int) -> Tensor:
    """`[total]` segment index of every item, for items laid out segment after segment
    (`counts` >= 1 each); a cumsum of start markers, cheaper than repeat_interleave."""
    marks = torch.zeros(total, dtype=torch.int64, device=counts.device)
    if counts.numel() > 1:
        marks[torch.cumsum(counts, 0)[:-1]] = 1
    return torch.cumsum(marks, 0)


def _run_sums(src: Tensor, rows: Tensor | None, counts: Tensor, group: int) -> tuple[Tensor, Tensor, Tensor]:
    """One accumulator level of torch's cascade sum.

    Item t is `src[rows[t]]` (or `src[t]` when `rows` is None); the items of segment s are the
    next `counts[s]` ones, in order. Each segment's items are cut into runs of `group`, and every
    run is summed sequentially starting from 0 - which is what `embedding_bag(mode="sum")` does
    per bag, in one pass over the items (no padded copy). Returns `(full, full_counts, residue)`:
    the sums of the complete runs (pushed to the next level, segment after segment, in order),
    their number per segment, and each segment's incomplete last run `[nseg, C]` (0 if empty).
    """
    dev = src.device
    nfull = counts // group
    slots = nfull + 1  # the complete runs, then the (possibly empty) residue
    total = int(slots.sum())
    base = torch.cumsum(slots, 0) - slots
    slot_seg = segment_ids(slots, total)
    slot_rank = torch.arange(total, device=dev) - base[slot_seg]
    # Bag b spans items [offsets[b], offsets[b + 1]): a full run is `group` items, a residue
    # runs to the start of the next segment (an empty bag sums to 0).
    offsets = (torch.cumsum(counts, 0) - counts)[slot_seg] + group * slot_rank
    items = torch.arange(int(counts.sum()), device=dev) if rows is None else rows
    acc = F.embedding_bag(items, src, offsets, mode="sum")
    is_full = slot_rank < nfull[slot_seg]
    return acc[is_full], nfull, acc[base + nfull]


def _cascade_sums(src: Tensor, rows: Tensor | None, counts: Tensor) -> Tensor:
    """Per-segment sums in the order of ATen's `multi_row_sum` (4 levels of 16, <= 2**19 rows):
    rows go into acc0; every 16 rows acc0 is pushed into acc1, every 256 acc1 into acc2, every
    4096 acc2 into acc3; the result is ((acc0 + acc1) + acc2) + acc3. Items as in `_run_sums`."""
    out = None
    for _level in range(3):
        src, counts, residue = _run_sums(src, rows, counts, 16)
        rows = None
        out = residue if out is None else out + residue
        if src.shape[0] == 0:  # nothing pushed up: the higher accumulators stay 0
            return out
    return out + _run_sums(src, None, counts, int(counts.max()) + 1)[2]


def torch_like_sums(src: Tensor, rows: Tensor, seg: Tensor, rank: Tensor, counts: Tensor, lanes: int) -> Tensor:
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
        # All columns go through the cascade (embedding_bag reads whole rows; a column slice
        # would be copied first); the last `c - wide` are replaced below.
        out[:, :wide] = _cascade_sums(src, rows, counts)[:, :wide]
    if wide < c:
        rest = src[rows, wide:]
        quads = counts // 4
        inside = rank < 4 * quads[seg]
        sseg = seg[inside] * 4 + rank[inside] % 4
        scounts = quads[:, None].expand(nseg, 4).reshape(-1)
        if bool(inside.any()):
            order = torch.sort(sseg, stable=True).indices  # streams contiguous, rows in order
            parts = _cascade_sums(rest[inside][order], None, scounts)
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


def mean_emulation_lanes(width: int, dtype: torch.dtype, device: torch.device) -> int | None:
    """SIMD lane count for which `torch_like_sums` reproduces `x[rows].mean(0)` bitwise on this
    machine, or None (not a CPU, not float32/float64, or no lane count matches)."""
    if device.type != "cpu" or dtype not in (torch.float32, torch.float64):
        return None
    return _lanes_on_cpu(width, dtype, torch.get_num_threads(), torch.backends.cpu.get_cpu_capability())


@functools.cache
def _lanes_on_cpu(width: int, dtype: torch.dtype, threads: int, capability: str) -> int | None:
    """The self-check behind `mean_emulation_lanes`: a pure function of its arguments (the
    kernel torch picks depends on them only), so its answer is computed once per key and kept by
    `functools.cache` (whose dict is safe to share between threads; two threads racing on a new
    key compute the same value). `threads` and `capability` are part of the key only."""
    gen = torch.Generator().manual_seed(12345)
    sizes = torch.tensor([1, 2, 3, 5, 15, 16, 17, 33, 255, 257, 300, 4099])
    vals = torch.randn(int(sizes.sum()), width, generator=gen, dtype=dtype)
    seg = segment_ids(sizes, vals.shape[0])
    rank = torch.arange(vals.shape[0]) - (torch.cumsum(sizes, 0) - sizes)[seg]
    want = torch.stack([part.mean(0) for part in vals.split(sizes.tolist())])
    # 512-bit (AVX512) and 256-bit (AVX2 / default) vectors, float32 first.
    for lanes in (16, 8, 4, 32, 2):
        got = torch_like_sums(vals, torch.arange(vals.shape[0]), seg, rank, sizes, lanes)
        if torch.equal(got / sizes.to(dtype)[:, None], want):
            return lanes
    return None
