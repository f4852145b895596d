"""How much of the pyramid gated encoding needs, against how close it stays to full encoding.

    python benchmarks/gate_margin.py                      # K-Means, default budgets, margins 1..16
    python benchmarks/gate_margin.py --margins 2,4,8 --images 1 --selector kmeans --json

For each aerial image and question: one cold `encode="full"` run (the reference point), one full
run with another K-Means seed (the noise floor: how much full K-Means agrees with itself), then one
cold `encode="gated"` run per margin m (tiles until they hold >= m x the scale's budget in
tokens). Reported per margin, averaged over the runs and the fine scales: the share of the
pyramid's tiles encoded, two IoUs against full - of the tokens kept as single rows (the most
relevant ones, preserved one by one) and of every position the LLM saw (merged rows' members
included) -, whether the answer ids agree, and the seconds of encode + select (grouping
included). Random benchmark-size model of `benchmarks/pipeline.py` (CLIP 256x4, Qwen2 512x4),
CPU, fp32.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
AERIAL = ROOT.parent / "shared" / "assets" / "aerial"
IMAGES = ["neon_yell_2299x2472.png", "neon_yell_1249x1035.png"]
QUESTIONS = ["How many trees are in the image?", "Where is the road?"]
#: The benchmark-size random model (`benchmarks/pipeline.py`'s defaults).
BENCHMARK_MODEL = dict(hidden=512, layers=4, heads=8, kv_heads=2, clip_hidden=256, clip_layers=4)


def benchmark_pipeline(tmp: Path, **defaults) -> Any:
    """`UhrBatPipeline` of the benchmark-size random model, no scene cache (every question cold)."""
    from uhrbat.pipeline import UhrBatPipeline
    from uhrbat.testing import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(tmp / "bench", **BENCHMARK_MODEL)
    pipe = UhrBatPipeline.from_pretrained(ckpt, scene_cache=False, **defaults)
    pipe.model.config.max_context = 100_000  # the default budgets exceed the tiny model's context
    pipe.processor.max_context = 100_000
    return pipe


def covered(res, scale: int) -> set[int]:
    """Token positions of `scale` that the LLM saw, alone or inside a merged row."""
    return {p for t in res.tokens if t.scale == scale for p in t.members}


def kept(res, scale: int) -> set[int]:
    """Positions of `scale` kept as single rows."""
    return {t.members[0] for t in res.tokens if t.scale == scale and not t.merged}


def iou(a: set[int], b: set[int]) -> float:
    return len(a & b) / max(1, len(a | b))


def compare(full, other) -> dict:
    """Mean IoUs over the fine scales, tiles held, answer agreement, encode + select seconds."""
    fine = other.scales[1:]
    return {
        "tiles": sum(v["held"] for v in other.tiles.values()) / sum(v["total"] for v in other.tiles.values()),
        "kept_iou": sum(iou(kept(full, s), kept(other, s)) for s in fine) / len(fine),
        "seen_iou": sum(iou(covered(full, s), covered(other, s)) for s in fine) / len(fine),
        "same_answer": other.generated_ids == full.generated_ids,
        "seconds": other.timings["encode"] + other.timings["select"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--margins", default="1,2,4,8,16")
    ap.add_argument("--images", type=int, default=2, help="how many of the aerial images")
    ap.add_argument("--questions", type=int, default=1, help="questions per image")
    ap.add_argument("--selector", default="kmeans")
    ap.add_argument("--budgets", default="80,320,600,2000")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        pipe = benchmark_pipeline(Path(tmp))
    budgets = [int(b) for b in args.budgets.split(",")]
    opts = dict(budgets=budgets, selector=args.selector, kmeans_clusters=0, kmeans_iters=args.iters)
    margins = [float(m) for m in args.margins.split(",")]
    rows: dict[str, list[dict]] = {"full, seed 1": [], **{f"{m:g}": [] for m in margins}}
    for name in IMAGES[: args.images]:
        for question in QUESTIONS[: args.questions]:
            image = AERIAL / name
            t = time.perf_counter()
            full = pipe.ask(image, question, max_new_tokens=8, **opts)
            rows["full, seed 1"].append(compare(full, pipe.ask(image, question, max_new_tokens=8, **opts, seed=1)))
            print(f"{name} | {question} | full x2 {time.perf_counter() - t:.1f}s", flush=True)
            for m in margins:
                gated = pipe.ask(image, question, max_new_tokens=8, encode="gated", gate_margin=m, **opts)
                rows[f"{m:g}"].append(compare(full, gated))
    out = {
        name: {
            k: sum(float(x[k]) for x in r) / len(r) for k in ("tiles", "kept_iou", "seen_iou", "same_answer", "seconds")
        }
        for name, r in rows.items()
    }
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(
        f"\n{args.selector}, budgets {args.budgets}, K = budget, <= {args.iters} iterations; "
        f"means of {len(rows['full, seed 1'])} run(s)"
    )
    print(
        "| gate margin | tiles encoded | IoU kept tokens | IoU all seen positions | answers = full "
        "| encode + select (s) |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name, o in out.items():
        print(
            f"| {name} | {o['tiles']:.0%} | {o['kept_iou']:.2f} | {o['seen_iou']:.2f} | {o['same_answer']:.0%} "
            f"| {o['seconds']:.1f} |"
        )


if __name__ == "__main__":
    main()
