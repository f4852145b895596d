"""Per-stage wall time and peak memory of one UHR-BAT query on a random model.

    python benchmarks/pipeline.py --reference-settings          # paper settings, CPU, 1 thread
    python benchmarks/pipeline.py --clusters 0 --iters 10        # K = budget, <= 10 iterations
    python benchmarks/pipeline.py --device cuda --dtype bf16 --clip-width 1024 --clip-layers 24 ...
    python benchmarks/pipeline.py --reference-settings --repeat 1 --dump-kmeans feats/
        # then: python benchmarks/kmeans.py --features feats/kmeans_82944.safetensors --modes fast

Times are also given in "yardstick units": 1 unit = one fp32 1024x1024 @ 1024x1024 torch.mm on
the same threads, measured in this process before every timed question, so figures from
different machines (and a shared machine under changing load) compare. Every question is cold
(no scene cache); `--repeat N` (default 3) times N of them after a warm-up and reports each
run, the per-stage median and the range of the totals.
Stages: tiles (pad/resize/normalise), encode (CLIP + projector), score (LLM pass to the last
layer + Q.K), group (K-Means), select (preserve-and-merge + token MLP), prefill, decode.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_IMAGE = ROOT.parent / "shared" / "assets" / "aerial" / "neon_yell_2299x2472.png"
STAGES = ("load", "tiles", "encode", "score", "group", "select", "prefill", "decode")


class PeakRSS:
    """Samples the process RSS in a thread; `.take()` returns the peak since the last call (MB)."""

    def __init__(self, period: float = 0.002) -> None:
        self.proc = psutil.Process()
        self.peak = self.proc.memory_info().rss
        self.period = period
        self.stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.period)

    def take(self) -> float:
        p = max(self.peak, self.proc.memory_info().rss)
        self.peak = self.proc.memory_info().rss
        return p / 2**20


def yardstick(device: str, clock=time.perf_counter) -> float:
    """Best of 7 fp32 1024^3 matmuls on `clock` (wall time, or `time.process_time` for CPU time)."""
    a = torch.randn(1024, 1024, device=device)
    b = torch.randn(1024, 1024, device=device)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(7):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = clock()
        a @ b
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, clock() - t)
    return best


def build_model(args: argparse.Namespace, path: Path) -> Path:
    from uhrbat.testing import make_tiny_checkpoint

    return make_tiny_checkpoint(
        path,
        hidden=args.llm_width,
        layers=args.llm_layers,
        heads=args.llm_heads,
        kv_heads=args.llm_kv_heads,
        clip_hidden=args.clip_width,
        clip_layers=args.clip_layers,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image", default=str(DEFAULT_IMAGE))
    ap.add_argument("--question", default="How many trees are in the image?")
    ap.add_argument("--budgets", default="80,320,600,2000")
    ap.add_argument("--clusters", type=int, default=0, help="K-Means clusters (0 = budget)")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--kmeans", default="fast", choices=["fast", "exact"])
    ap.add_argument("--selector", default="kmeans", choices=["kmeans", "segments", "topk"])
    ap.add_argument("--reference-settings", action="store_true", help="600 clusters, 100 iterations, paper budgets")
    ap.add_argument("--clip-width", type=int, default=256)
    ap.add_argument("--clip-layers", type=int, default=4)
    ap.add_argument("--llm-width", type=int, default=512)
    ap.add_argument("--llm-layers", type=int, default=4)
    ap.add_argument("--llm-heads", type=int, default=8)
    ap.add_argument("--llm-kv-heads", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--model", default=None, help="use this checkpoint instead of a random one")
    ap.add_argument("--repeat", type=int, default=3, help="timed questions (median and range reported)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument(
        "--dump-kmeans",
        metavar="DIR",
        help="write each scale's K-Means input (features, init_indices, max_iters) of the first timed "
        "question to DIR/kmeans_<N>.safetensors, for benchmarks/kmeans.py --features",
    )
    args = ap.parse_args()
    if args.reference_settings:
        args.clusters, args.iters, args.budgets = 600, 100, "80,320,600,2000"
    torch.set_num_threads(args.threads)

    from uhrbat.pipeline import UhrBatPipeline

    mem = PeakRSS()
    with tempfile.TemporaryDirectory() as tmp:
        model_path = args.model or build_model(args, Path(tmp) / "model")
        pipe = UhrBatPipeline.from_pretrained(
            model_path,
            device=args.device,
            dtype=args.dtype,
            budgets=[int(b) for b in args.budgets.split(",")],
            selector=args.selector,
            kmeans_clusters=args.clusters,
            kmeans_iters=args.iters,
            kmeans_mode=args.kmeans,
            scene_cache=False,  # every timed question is cold: tiles, encode and K-Means run
        )
        pipe.model.config.max_context = 100_000
        pipe.processor.max_context = 100_000
        mem.take()
        pipe.ask(args.image, args.question, max_new_tokens=2)  # warm-up (allocator, kernels)
        mem.take()
        runs = []
        for i in range(args.repeat):
            dump = _KMeansDump(Path(args.dump_kmeans)) if args.dump_kmeans and i == 0 else None
            # The unit is re-measured before every run: on a shared machine the load changes.
            unit = yardstick(args.device)
            cpu_unit = yardstick(args.device, time.process_time) if args.device == "cpu" else None
            t, c = time.perf_counter(), time.process_time()
            res = pipe.ask(
                args.image, args.question, max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens
            )
            total, cpu = time.perf_counter() - t, time.process_time() - c
            if dump is not None:
                dump.close()
            runs.append(_run_record(res, total, unit, mem.take()))
            if cpu_unit is not None:
                runs[-1].update(cpu_seconds=cpu, cpu_yardstick_seconds=cpu_unit, cpu_units=cpu / cpu_unit)
    med = {k: statistics.median(r["stages_units"][k] for r in runs) for k in STAGES}
    totals = [r["total_units"] for r in runs]
    out = {
        "settings": {
            k: getattr(args, k)
            for k in ("budgets", "clusters", "iters", "kmeans", "selector", "threads", "device", "dtype")
        },
        "model": {
            k: getattr(args, k)
            for k in ("clip_width", "clip_layers", "llm_width", "llm_layers", "llm_heads", "llm_kv_heads")
        },
        "image": args.image,
        "runs": runs,
        "median_stages_units": med,
        "median_total_units": statistics.median(totals),
        "total_units_range": [min(totals), max(totals)],
        "median_cpu_units": statistics.median(r["cpu_units"] for r in runs) if "cpu_units" in runs[0] else None,
        "visual_tokens": runs[-1]["visual_tokens"],
    }
    if args.device.startswith("cuda"):
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if args.json:
        print(json.dumps(out, indent=2))
        return
    units = [r["yardstick_seconds"] * 1000 for r in runs]
    print(
        f"yardstick: {min(units):.1f}-{max(units):.1f} ms per 1024^3 fp32 mm ({args.threads} thread(s), "
        f"{args.device}); {len(runs)} run(s); units = seconds / that run's yardstick"
    )
    print(f"{'stage':<10}" + "".join(f"{'run ' + str(i + 1):>10}" for i in range(len(runs))) + f"{'median':>10}")
    for k in STAGES:
        print(f"{k:<10}" + "".join(f"{r['stages_units'][k]:>10.1f}" for r in runs) + f"{med[k]:>10.1f}")
    print(f"{'total':<10}" + "".join(f"{v:>10.1f}" for v in totals) + f"{statistics.median(totals):>10.1f}")
    if "cpu_units" in runs[0]:
        # Process CPU time over CPU-time units: what the question costs this process, less
        # sensitive than wall time to other jobs on the machine (not to their cache pressure).
        cpu = [r["cpu_units"] for r in runs]
        print(f"{'cpu time':<10}" + "".join(f"{v:>10.1f}" for v in cpu) + f"{statistics.median(cpu):>10.1f}")
    peak = max(r["peak_rss_mb"] for r in runs)
    print(f"peak RSS during the queries: {peak:.0f} MB; visual tokens: {out['visual_tokens']}")


class _KMeansDump:
    """Wraps `selection.kmeans` (the pipeline's only K-Means entry) to save every call's input;
    the random initial rows are drawn here, as `kmeans` draws them, and passed on explicitly."""

    def __init__(self, out: Path) -> None:
        import uhrbat.compression.selection as selection

        self.selection, self.original, self.out = selection, selection.kmeans, out
        out.mkdir(parents=True, exist_ok=True)
        selection.kmeans = self

    def __call__(self, features, num_clusters, max_iters, generator=None, mode="fast", init_indices=None):
        from safetensors.torch import save_file

        n = features.shape[0]
        if init_indices is None:
            init_indices = torch.randperm(n, generator=generator)[: min(max(1, int(num_clusters)), n)]
        save_file(
            {
                "features": features.float().contiguous(),
                "init_indices": torch.as_tensor(init_indices).reshape(-1).long(),
                "max_iters": torch.tensor([int(max_iters)]),
            },
            str(self.out / f"kmeans_{n}.safetensors"),
        )
        return self.original(features, num_clusters, max_iters, mode=mode, init_indices=init_indices)

    def close(self) -> None:
        self.selection.kmeans = self.original


def _run_record(res, total: float, unit: float, peak: float) -> dict:
    """Stage seconds and units of one timed question (K-Means, "group", split out of "select")."""
    stages = dict(res.timings)
    stages["group"] = res.timings_detail.get("group", 0.0)
    stages["select"] = stages["select"] - stages["group"]
    stages = {k: stages[k] for k in STAGES}
    return {
        "yardstick_seconds": unit,
        "stages_seconds": stages,
        "stages_units": {k: v / unit for k, v in stages.items()},
        "total_seconds": total,
        "total_units": total / unit,
        "peak_rss_mb": peak,
        "visual_tokens": res.num_visual_tokens,
    }


if __name__ == "__main__":
    sys.exit(main())
