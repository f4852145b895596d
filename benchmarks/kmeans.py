"""Benchmark: reference-style Lloyd K-Means vs `uhrbat.compression.kmeans` (fast / exact).

Times are reported in *yardstick units*: 1 unit = one fp32 1024x1024 @ 1024x1024 `torch.mm`
on one thread, measured in the same process, so figures from different machines compare.

Default data imitate the benchmark target: N = 82944 (4032 px scale) and 36864 (2688 px) tokens,
F = 514 features (a 512-wide LLM embedding, L2-normalised, plus the 2 tile-local coordinates
scaled by 0.05, as `clustering_features` builds them), drawn from a mixture of K unit-sphere
Gaussians with Zipf-distributed weights. With the default spread, random-init Lloyd needs
tens of iterations to settle, like real features. `--features file.safetensors` benchmarks
real `[N, F]` features instead.

Settings: (a) K=600, max_iters=100 (paper-style eval); (b) K=2000, max_iters=10.

    python benchmarks/kmeans.py --quick
    python benchmarks/kmeans.py                       # full sizes (several minutes)
    python benchmarks/kmeans.py --features feats.safetensors --key kmeans_features
    python benchmarks/kmeans.py --features feats/kmeans_82944.safetensors   # from pipeline.py --dump-kmeans

A `--features` file written by `benchmarks/pipeline.py --dump-kmeans` also holds the pipeline's
own `init_indices` and `max_iters`: that K-Means run is then replayed as the pipeline ran it.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

from uhrbat.compression.kmeans import KMeansResult, kmeans, tile_coordinates


def yardstick_seconds(repeats: int = 10) -> float:
    """Median seconds of one fp32 1024³ matmul (one thread)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(1024, 1024, generator=gen)
    b = torch.randn(1024, 1024, generator=gen)
    for _ in range(3):
        torch.mm(a, b)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def make_features(n: int, dim: int, k: int, spread: float, zipf: float, seed: int) -> torch.Tensor:
    """`[n, dim]` float32: normalised mixture-of-Gaussians embedding (dim - 2) + 0.05 * coords."""
    gen = torch.Generator().manual_seed(seed)
    d = dim - 2
    means = F.normalize(torch.randn(k, d, generator=gen), dim=1)
    weights = (torch.arange(k, dtype=torch.float64) + 1.0) ** -zipf
    comp = torch.multinomial(weights, n, replacement=True, generator=gen)
    noise = torch.randn(n, d, generator=gen) * (spread / math.sqrt(d))
    emb = F.normalize(means[comp] + noise, dim=1)
    tiles = -(-n // 576)
    coords = 0.05 * tile_coordinates(24).repeat(tiles, 1)[:n]
    return torch.cat([emb, coords], dim=1).contiguous()


def reference_lloyd(x: torch.Tensor, init: torch.Tensor, iters: int) -> tuple[torch.Tensor, int, bool]:
    """The reference's `_run_kmeans` loop: cdist, argmin, per-cluster Python mean."""
    centers = x[init]
    labels = None
    it = 0
    converged = False
    for _ in range(max(1, iters)):
        it += 1
        labels = torch.cdist(x, centers, p=2).argmin(dim=1)
        new = centers.clone()
        for j in range(centers.shape[0]):
            mask = labels == j
            if mask.any():
                new[j] = x[mask].mean(0)
        if torch.allclose(new, centers):
            converged = True
            break
        centers = new
    assert labels is not None
    return labels, it, converged


def run_case(
    x: torch.Tensor, k: int, iters: int, modes: list[str], seed: int, init: torch.Tensor | None = None
) -> None:
    n = x.shape[0]
    k = min(k, n) if init is None else init.numel()
    if init is None:
        init = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k]
    print(f"\nN={n} F={x.shape[1]} K={k} max_iters={iters}")
    ref_labels = None
    ref_units = None
    for mode in modes:
        # The unit is re-measured right before every run, so that a machine whose load
        # changes during the benchmark still gives comparable unit counts.
        unit = yardstick_seconds()
        t0 = time.perf_counter()
        if mode == "reference":
            labels, it, conv = reference_lloyd(x, init, iters)
            work = 1.0
            extra = ""
        else:
            res: KMeansResult = kmeans(x, k, iters, mode=mode, init_indices=init)
            labels, it, conv = res.labels, res.iterations, res.converged
            work = res.distance_evaluations / (it * n * k)
            extra = f" exact_means={res.exact_means}"
        dt = time.perf_counter() - t0
        units = dt / unit
        same = "" if ref_labels is None else f" labels==reference: {torch.equal(labels, ref_labels)}"
        speed = "" if ref_units is None else f" speedup x{ref_units / units:.1f}"
        print(
            f"  {mode:9s} {dt:8.2f} s = {units:8.0f} units (unit {unit * 1e3:.1f} ms)  iters={it:3d}"
            f" converged={conv} distance work={work:6.1%}{speed}{same}{extra}",
            flush=True,
        )
        if mode == "reference":
            ref_labels, ref_units = labels, units


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes (N=9216, 2304; F=130)")
    ap.add_argument("--sizes", type=int, nargs="+", help="token counts N (default 82944 36864)")
    ap.add_argument("--dim", type=int, default=None, help="feature width F incl. 2 coords (514)")
    ap.add_argument("--settings", nargs="+", default=None, help="K:max_iters pairs (default 600:100 2000:10)")
    ap.add_argument(
        "--modes", nargs="+", default=["reference", "fast", "exact"], choices=["reference", "fast", "exact"]
    )
    ap.add_argument("--spread", type=float, default=2.0, help="noise / signal of the mixture")
    ap.add_argument("--zipf", type=float, default=0.8, help="Zipf exponent of component weights")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--features", help="safetensors file with real [N, F] features")
    ap.add_argument("--key", help="tensor name inside --features (default: the first 2-D one)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    unit = yardstick_seconds()
    print(
        f"torch {torch.__version__}, threads={torch.get_num_threads()}, "
        f"cpu={torch.backends.cpu.get_cpu_capability()}, yardstick unit = {unit * 1e3:.2f} ms"
    )

    if args.quick:
        sizes, dim, settings = args.sizes or [9216, 2304], args.dim or 130, args.settings or ["100:30", "300:10"]
    else:
        sizes, dim, settings = args.sizes or [82944, 36864], args.dim or 514, args.settings or ["600:100", "2000:10"]
    pairs = [tuple(int(v) for v in s.split(":")) for s in settings]

    if args.features:
        from safetensors.torch import load_file

        tensors = load_file(args.features)
        name = args.key or next(n for n, t in tensors.items() if t.dim() == 2)
        feats = [tensors[name].float().contiguous()]
        print(f"features: {args.features}:{name} {tuple(feats[0].shape)}")
        if "init_indices" in tensors and args.settings is None:
            init = tensors["init_indices"].long()
            run_case(feats[0], init.numel(), int(tensors["max_iters"]), args.modes, args.seed, init)
            return
        for k, iters in pairs:
            run_case(feats[0], k, iters, args.modes, args.seed)
        return
    for n in sizes:
        for k, iters in pairs:
            x = make_features(n, dim, k, args.spread, args.zipf, args.seed)
            run_case(x, k, iters, args.modes, args.seed)


if __name__ == "__main__":
    main()
