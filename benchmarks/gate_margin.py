"""How much of the pyramid gated encoding needs, against how close it stays to full encoding.

    python benchmarks/gate_margin.py                      # K-Means, default budgets, margins 1..16
    python benchmarks/gate_margin.py --margins 2,4,8 --images 1 --selector kmeans --json

For each aerial image and question: one cold `encode="full"` run (the reference point), then one
cold `encode="gated"` run per margin m (tiles until they hold >= m x the scale's budget in
tokens). Reported per margin, averaged over the runs: the share of the pyramid's tiles encoded,
the kept-token IoU per fine scale against full (positions covered by kept and merged rows),
whether the answer ids agree, and the seconds of encode + select (grouping included). Random
benchmark-size model of `benchmarks/pipeline.py` (CLIP 256x4, Qwen2 512x4), CPU, fp32.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
AERIAL = ROOT.parent / "shared" / "assets" / "aerial"
IMAGES = ["neon_yell_2299x2472.png", "neon_yell_1249x1035.png"]
QUESTIONS = ["How many trees are in the image?", "Where is the road?"]


def covered(res, scale: int) -> set[int]:
    """Token positions of `scale` that the LLM saw, alone or inside a merged row."""
    return {p for t in res.tokens if t.scale == scale for p in t.members}


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

    from uhrbat.pipeline import UhrBatPipeline
    from uhrbat.testing import make_tiny_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_tiny_checkpoint(
            Path(tmp) / "bench", hidden=512, layers=4, heads=8, kv_heads=2, clip_hidden=256, clip_layers=4
        )
        pipe = UhrBatPipeline.from_pretrained(ckpt, scene_cache=False)
    budgets = [int(b) for b in args.budgets.split(",")]
    opts = dict(budgets=budgets, selector=args.selector, kmeans_clusters=0, kmeans_iters=args.iters)
    margins = [float(m) for m in args.margins.split(",")]
    rows: dict[float, list[dict]] = {m: [] for m in margins}
    full_cost = []
    for name in IMAGES[: args.images]:
        for question in QUESTIONS[: args.questions]:
            image = AERIAL / name
            t = time.perf_counter()
            full = pipe.ask(image, question, max_new_tokens=8, **opts)
            full_cost.append(full.timings["encode"] + full.timings["select"])
            print(f"{name} | {question} | full {time.perf_counter() - t:.1f}s", flush=True)
            for m in margins:
                gated = pipe.ask(image, question, max_new_tokens=8, encode="gated", gate_margin=m, **opts)
                fine = gated.scales[1:]
                ious = {}
                for s in fine:
                    a, b = covered(full, s), covered(gated, s)
                    ious[s] = len(a & b) / max(1, len(a | b))
                rows[m].append(
                    {
                        "tiles": sum(v["held"] for v in gated.tiles.values())
                        / sum(v["total"] for v in gated.tiles.values()),
                        "iou": ious,
                        "same_answer": gated.generated_ids == full.generated_ids,
                        "seconds": gated.timings["encode"] + gated.timings["select"],
                    }
                )
    out = []
    for m in margins:
        r = rows[m]
        scales = r[0]["iou"].keys()
        out.append(
            {
                "margin": m,
                "tiles_encoded": sum(x["tiles"] for x in r) / len(r),
                "iou": {s: sum(x["iou"][s] for x in r) / len(r) for s in scales},
                "answers_equal": sum(x["same_answer"] for x in r) / len(r),
                "seconds": sum(x["seconds"] for x in r) / len(r),
            }
        )
    full_s = sum(full_cost) / len(full_cost)
    if args.json:
        print(json.dumps({"full_seconds": full_s, "rows": out}, indent=2))
        return
    print(f"\nfull: 100% of tiles, encode + select {full_s:.1f} s (mean of {len(full_cost)} runs)")
    print("| margin | tiles encoded | kept-token IoU per fine scale | answers = full | encode + select (s) |")
    print("|---:|---:|---|---:|---:|")
    for o in out:
        iou = ", ".join(f"{s}: {v:.2f}" for s, v in o["iou"].items())
        print(f"| {o['margin']:g} | {o['tiles_encoded']:.0%} | {iou} | {o['answers_equal']:.0%} | {o['seconds']:.1f} |")


if __name__ == "__main__":
    main()
