"""Benchmark: `uhrbat batch` rows/s, local engine vs Ray, with k questions per scene.

For each engine (local, ray) and each k (default 1 and 4) a fresh subprocess runs `run_batch`
over S generated scenes x k questions into an empty run folder and reports:

* wall seconds (model load and, for Ray, cluster start and actor start-up included) and
  rows/s over that wall time;
* "steady" rows/s: rows after the first one divided by the time from the first written row to
  the last (start-up excluded);
* scenes prepared (encoded + scored; cache hits excluded) and scenes prepared per second;
* peak RSS of the process tree (driver + Ray's raylet, GCS and actor processes), sampled every
  0.1 s with psutil.

The model is a random tiny checkpoint (`uhrbat.testing.make_tiny_checkpoint`, 672/1344 px
scales) unless `--model` names one, so the figures measure the batch machinery and scene reuse,
not a 7B LLM. Ray runs `--actors` actors with 1 CPU each on a local Ray of `--ray-cpus` CPUs.

    python benchmarks/batch.py                      # S=8 scenes, k=1 and 4, local and ray
    python benchmarks/batch.py --scenes 4 --ks 1 --engines local
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

QUESTIONS = [
    "How many ships are in the harbour?",
    "Is there a red car in the parking lot?",
    "Describe where the pond is.",
    "What is the colour of the roof?",
    "Is there a bridge?",
    "How many storage tanks are there?",
]


def _peak_rss(stop: threading.Event, out: list[int]) -> None:
    import psutil

    me = psutil.Process()
    peak = 0
    while not stop.is_set():
        total = 0
        try:
            procs = [me, *me.children(recursive=True)]
        except psutil.Error:
            procs = [me]
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        peak = max(peak, total)
        stop.wait(0.1)
    out.append(peak)


def one(args: argparse.Namespace) -> dict:
    """Run one configuration in this process and return its figures."""
    import numpy as np
    import torch
    from PIL import Image

    from uhrbat.batch import BatchConfig, BatchRow, run_batch
    from uhrbat.batch.output import PredictionStore

    torch.set_num_threads(1)
    work = Path(args.work)
    rows = []
    rng = np.random.default_rng(0)
    for s in range(args.scenes):
        path = work / "scenes" / f"scene{s:03d}.png"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)).save(path)
        for q in QUESTIONS[: args.k]:
            rows.append(BatchRow(id=f"{s}-{q}", image=path.name, question=q, path=str(path)))
    out = work / f"run-{args.engine}-k{args.k}"
    cfg = BatchConfig(
        out=out,
        model=args.model,
        engine=args.engine,
        progress=False,
        max_new_tokens=args.max_new_tokens,
        selection={"budgets": [8, 16], "kmeans_clusters": 8, "kmeans_iters": 5},
        actors=args.actors,
        cpus_per_actor=1.0,
        ray_local_cpus=args.ray_cpus,
    )
    written_at: list[float] = []
    original = PredictionStore.write

    def timed_write(self, answered):  # record when each row lands (steady-state rate)
        wrote = original(self, answered)
        written_at.append(time.perf_counter())
        return wrote

    PredictionStore.write = timed_write  # type: ignore[method-assign]
    stop, peak = threading.Event(), []
    sampler = threading.Thread(target=_peak_rss, args=(stop, peak), daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    summary = run_batch(rows, cfg)
    wall = time.perf_counter() - t0
    stop.set()
    sampler.join()
    steady = (len(written_at) - 1) / (written_at[-1] - written_at[0]) if len(written_at) > 1 else float("nan")
    return {
        "engine": args.engine,
        "k": args.k,
        "scenes": args.scenes,
        "rows": summary.written,
        "errors": summary.errors,
        "wall_s": wall,
        "rows_per_s": summary.written / wall,
        "steady_rows_per_s": steady,
        "scenes_prepared": summary.scenes_prepared,
        "scenes_prepared_per_s": summary.scenes_prepared / wall,
        "peak_rss_mib": peak[0] / 2**20,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scenes", type=int, default=8)
    ap.add_argument("--ks", default="1,4", help="questions per scene, comma-separated")
    ap.add_argument("--engines", default="local,ray")
    ap.add_argument("--size", type=int, default=640, help="side of each generated scene (px)")
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--ray-cpus", type=int, default=2)
    ap.add_argument("--model", default=None, help="checkpoint (default: a random tiny one)")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--engine", default="local", help=argparse.SUPPRESS)
    ap.add_argument("--k", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args)))
        return
    with tempfile.TemporaryDirectory(prefix="uhrbat-bench-batch-") as tmp:
        model = args.model
        if model is None:
            from uhrbat.testing import make_tiny_checkpoint

            model = str(make_tiny_checkpoint(Path(tmp) / "tiny", seed=0, scales=[672, 1344], budgets=[8, 16]))
        results = []
        for k in [int(x) for x in args.ks.split(",")]:
            for engine in args.engines.split(","):
                cmd = [
                    sys.executable,
                    __file__,
                    "--one",
                    "--engine",
                    engine,
                    "--k",
                    str(k),
                    "--work",
                    tmp,
                    "--model",
                    model,
                    "--scenes",
                    str(args.scenes),
                    "--size",
                    str(args.size),
                    "--max-new-tokens",
                    str(args.max_new_tokens),
                    "--actors",
                    str(args.actors),
                    "--ray-cpus",
                    str(args.ray_cpus),
                ]
                env = {**os.environ, "OMP_NUM_THREADS": "1"}
                res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
                if res.returncode != 0:
                    sys.exit(f"{engine} k={k} failed:\n{res.stderr[-3000:]}")
                r = json.loads(res.stdout.strip().splitlines()[-1])
                results.append(r)
                print(json.dumps(r), file=sys.stderr)
    print(
        f"\n{args.scenes} scenes of {args.size}x{args.size} px, tiny model, 1 thread per worker, "
        f"Ray: {args.actors} actors on {args.ray_cpus} CPUs\n"
    )
    print("| engine | k | rows | wall s | rows/s | steady rows/s | scenes prepared | scenes/s | peak RSS MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['engine']} | {r['k']} | {r['rows']} | {r['wall_s']:.1f} | {r['rows_per_s']:.2f} | "
            f"{r['steady_rows_per_s']:.2f} | {r['scenes_prepared']} | {r['scenes_prepared_per_s']:.2f} | "
            f"{r['peak_rss_mib']:.0f} |"
        )


if __name__ == "__main__":
    main()
