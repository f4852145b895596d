"""Benchmark: the DivPrune and DPP selectors (`uhrbat.compression.divprune` / `.dpp`) on one scale.

Times one selection of `budget` tokens out of N random `[N, D]` features (relevance uniform),
median of `--repeats` runs, one thread, with `select_topk` as the floor. Seconds, and
*yardstick units* (1 unit = one fp32 1024x1024 @ 1024x1024 `torch.mm` on one thread, measured in
the same process; see `benchmarks/kmeans.py`), so figures from different machines compare.

Default cases: the 4032 scale (N = 82,944, budget 2,000) at D = 64 and at D = 512 (the
benchmark-size model's LLM width), and the 2688 scale (N = 36,864, budget 600) at D = 512.
Both selectors cost about N*D*k multiply-adds (DPP in float64, DivPrune in float32).

    python benchmarks/diversity_selectors.py
    python benchmarks/diversity_selectors.py --case 82944,3584,2000 --repeats 1   # 7B width
"""

from __future__ import annotations

import argparse
import functools
import time

import torch

from kmeans import yardstick_seconds
from uhrbat.compression.divprune import select_divprune
from uhrbat.compression.dpp import select_dpp
from uhrbat.compression.selection import select_topk

DEFAULT_CASES = ["82944,64,2000", "82944,512,2000", "36864,512,600"]


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", action="append", help="N,D,budget (repeatable)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    unit = yardstick_seconds()
    print(f"yardstick: {unit * 1e3:.1f} ms (fp32 1024^3 mm, 1 thread); torch {torch.__version__}")
    print(f"{'N':>7} {'D':>5} {'budget':>6} | {'selector':<9} {'seconds':>8} {'units':>8}")
    for case in args.case or DEFAULT_CASES:
        n, d, k = (int(v) for v in case.split(","))
        gen = torch.Generator().manual_seed(0)
        feats = torch.randn(n, d, generator=gen)
        relevance = torch.rand(n, generator=gen)
        for name, fn in (("topk", select_topk), ("divprune", select_divprune), ("dpp", select_dpp)):
            sel = fn(feats, relevance, k)  # warm-up; checks the budget
            assert len(sel) == min(k, n)
            sec = median_seconds(functools.partial(fn, feats, relevance, k), args.repeats)
            print(f"{n:>7} {d:>5} {k:>6} | {name:<9} {sec:>8.3f} {sec / unit:>8.1f}")


if __name__ == "__main__":
    main()
