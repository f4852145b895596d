"""Cold vs warm questions with the scene cache, per stage, and an evaluation-style run.

    python benchmarks/scene_cache.py                        # paper settings, CPU, 1 thread, fp32
    python benchmarks/scene_cache.py --eval-images 20 --eval-questions 4 --eval-iters 100
    python benchmarks/scene_cache.py --device cuda --dtype bf16 --model RL-MIND/UHR-BAT

Part 1 (one scene, paper settings: budgets 80/320/600/2000, 600 clusters, <= 100 iterations,
the 2299x2472 image): a question without the cache, the same question with the cache cold
(miss), and a different follow-up question (hit). Part 2 (evaluation style): N images x Q
questions answered one by one, without and with the cache (images: crops of the shared aerial
assets; `--eval-*` choose the selection settings, the defaults keep it a few minutes on one
CPU thread). The model is the random benchmark model of `benchmarks/pipeline.py` unless
`--model` is given. Peak RSS (and CUDA memory) is reported per part.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline import DEFAULT_IMAGE, PeakRSS, build_model

STAGES = ("load", "tiles", "encode", "score", "group", "select", "prefill", "decode")
QUESTIONS = [
    "How many trees are in the image?",
    "Is there a road? Answer yes or no.",
    "Where is the largest open area?",
    "Describe the scene in one sentence.",
]


def stages(res) -> dict[str, float]:
    out = dict(res.timings)
    out["group"] = res.timings_detail.get("group", 0.0)
    out["select"] = out["select"] - out["group"]  # K-Means is reported on its own
    return {k: out.get(k, 0.0) for k in STAGES}


def timed(fn):
    t = time.perf_counter()
    res = fn()
    return res, time.perf_counter() - t


def eval_images(n: int, side: int) -> list[Image.Image]:
    """`n` distinct `side`-px crops of the shared aerial assets (decoded once, as PIL images)."""
    assets = sorted((DEFAULT_IMAGE.parent).glob("*.png"))
    bases = [Image.open(p).convert("RGB") for p in assets]
    out = []
    for i in range(n):
        im = bases[i % len(bases)]
        w, h = im.size
        s = min(side, w, h)
        k = i // len(bases)
        x = (k * 97) % max(1, w - s)
        y = (k * 61) % max(1, h - s)
        out.append(im.crop((x, y, x + s, y + s)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image", default=str(DEFAULT_IMAGE))
    ap.add_argument("--budgets", default="80,320,600,2000")
    ap.add_argument("--clusters", type=int, default=600)
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--kmeans", default="fast", choices=["fast", "exact"])
    ap.add_argument("--eval-images", type=int, default=6)
    ap.add_argument("--eval-questions", type=int, default=4)
    ap.add_argument("--eval-side", type=int, default=1024, help="side of the evaluation crops (px)")
    ap.add_argument("--eval-budgets", default="40,160,300,1000")
    ap.add_argument("--eval-clusters", type=int, default=0, help="0 = K is the scale's budget")
    ap.add_argument("--eval-iters", type=int, default=10)
    ap.add_argument("--skip-eval", action="store_true")
    ap.add_argument("--skip-one-scene", action="store_true")
    ap.add_argument(
        "--reuse-scoring-prefix",
        action="store_true",
        help="opt-in two-step scoring with the prefix KV cached (not bitwise the default one-pass scoring)",
    )
    ap.add_argument("--clip-width", type=int, default=256)
    ap.add_argument("--clip-layers", type=int, default=4)
    ap.add_argument("--llm-width", type=int, default=512)
    ap.add_argument("--llm-layers", type=int, default=4)
    ap.add_argument("--llm-heads", type=int, default=8)
    ap.add_argument("--llm-kv-heads", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--model", default=None, help="use this checkpoint instead of a random one")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from uhrbat.pipeline import UhrBatPipeline
    from uhrbat.scene.store import SceneStore

    mem = PeakRSS()
    cuda = args.device.startswith("cuda")
    out: dict = {
        "settings": {
            k: getattr(args, k)
            for k in (
                "budgets",
                "clusters",
                "iters",
                "kmeans",
                "threads",
                "device",
                "dtype",
                "max_new_tokens",
                "reuse_scoring_prefix",
            )
        }
    }
    gen = dict(max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        model_path = args.model or build_model(args, Path(tmp) / "model")
        sel = dict(
            budgets=[int(b) for b in args.budgets.split(",")],
            kmeans_clusters=args.clusters,
            kmeans_iters=args.iters,
            kmeans_mode=args.kmeans,
            reuse_scoring_prefix=args.reuse_scoring_prefix,
        )
        pipe = UhrBatPipeline.from_pretrained(model_path, device=args.device, dtype=args.dtype, **sel)
        plain = UhrBatPipeline(pipe.model, pipe.processor, scene_cache=False, **sel)
        pipe.processor.max_context = 100_000
        plain.ask(eval_images(1, 336)[0], "warm-up", max_new_tokens=2)  # allocator, kernels
        mem.take()
        if cuda:
            torch.cuda.reset_peak_memory_stats()

        # ---- part 1: one scene at paper settings
        if not args.skip_one_scene:
            uncached, t_uncached = timed(lambda: plain.ask(args.image, QUESTIONS[0], **gen))
            cold, t_cold = timed(lambda: pipe.ask(args.image, QUESTIONS[0], **gen))
            warm, t_warm = timed(lambda: pipe.ask(args.image, QUESTIONS[1], **gen))
            same = cold.generated_ids == uncached.generated_ids and [t.to_dict() for t in cold.tokens] == [
                t.to_dict() for t in uncached.tokens
            ]
            out["one_scene"] = {
                "image": args.image,
                "uncached": {"wall_s": t_uncached, "stages_s": stages(uncached)},
                "cold": {"wall_s": t_cold, "cache": cold.cache, "stages_s": stages(cold)},
                "warm_follow_up": {"wall_s": t_warm, "cache": warm.cache, "stages_s": stages(warm)},
                "speedup_warm_vs_cold": t_cold / t_warm,
                "cold_equals_uncached": same,
                "cache_bytes": pipe.scene_cache.nbytes(),
                "peak_rss_mb": mem.take(),
            }
            if cuda:
                out["one_scene"]["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
                torch.cuda.reset_peak_memory_stats()

        # ---- part 2: evaluation style, one question at a time
        if not args.skip_eval:
            esel = dict(
                budgets=[int(b) for b in args.eval_budgets.split(",")],
                kmeans_clusters=args.eval_clusters,
                kmeans_iters=args.eval_iters,
                kmeans_mode=args.kmeans,
                reuse_scoring_prefix=args.reuse_scoring_prefix,
            )
            images = eval_images(args.eval_images, args.eval_side)
            qs = (QUESTIONS * args.eval_questions)[: args.eval_questions]
            pipes = {
                "uncached": UhrBatPipeline(pipe.model, pipe.processor, scene_cache=False, **esel),
                "cached": UhrBatPipeline(pipe.model, pipe.processor, scene_cache=SceneStore(), **esel),
            }
            runs = {
                name: {"wall_s": 0.0, "peak_rss_mb": 0.0, "ids": [], "stage_sums_s": dict.fromkeys(STAGES, 0.0)}
                for name in pipes
            }
            # Interleaved image by image, so that load changes on a shared machine hit both alike.
            for im in images:
                for name, p in pipes.items():
                    mem.take()
                    t = time.perf_counter()
                    results = [p.ask(im, q, **gen) for q in qs]
                    run = runs[name]
                    run["wall_s"] += time.perf_counter() - t
                    run["peak_rss_mb"] = max(run["peak_rss_mb"], mem.take())
                    run["ids"] += [r.generated_ids for r in results]
                    for r in results:
                        for k, v in stages(r).items():
                            run["stage_sums_s"][k] += v
            out["eval"] = {
                "images": args.eval_images,
                "questions_per_image": args.eval_questions,
                "side": args.eval_side,
                "selection": esel,
                "uncached": {k: v for k, v in runs["uncached"].items() if k != "ids"},
                "cached": {k: v for k, v in runs["cached"].items() if k != "ids"},
                "speedup": runs["uncached"]["wall_s"] / runs["cached"]["wall_s"],
                "answers_identical": runs["uncached"]["ids"] == runs["cached"]["ids"],
            }
    if args.json:
        print(json.dumps(out, indent=2))
        return
    one = out.get("one_scene")
    if one is not None:
        print_one_scene(one, args)
    if "eval" in out:
        ev = out["eval"]
        print(
            f"evaluation: {ev['images']} images x {ev['questions_per_image']} questions ({ev['side']} px crops, "
            f"selection {ev['selection']}):"
        )
        print(
            f"  uncached {ev['uncached']['wall_s']:.1f} s (peak RSS {ev['uncached']['peak_rss_mb']:.0f} MB), "
            f"cached {ev['cached']['wall_s']:.1f} s (peak RSS {ev['cached']['peak_rss_mb']:.0f} MB): "
            f"{ev['speedup']:.1f}x; answers identical: {ev['answers_identical']}"
        )


def print_one_scene(one: dict, args: argparse.Namespace) -> None:
    print(
        f"one scene ({args.device}, {args.dtype}, {args.threads} thread(s); budgets {args.budgets}, "
        f"{args.clusters} clusters, <= {args.iters} iterations"
        f"{', scoring prefix reused' if args.reuse_scoring_prefix else ''}):"
    )
    print(f"{'stage':<10}{'uncached':>10}{'cold':>10}{'warm':>10}")
    for k in STAGES:
        print(
            f"{k:<10}{one['uncached']['stages_s'][k]:>10.3f}{one['cold']['stages_s'][k]:>10.3f}"
            f"{one['warm_follow_up']['stages_s'][k]:>10.3f}"
        )
    print(
        f"{'wall':<10}{one['uncached']['wall_s']:>10.3f}{one['cold']['wall_s']:>10.3f}{one['warm_follow_up']['wall_s']:>10.3f}"
    )
    print(
        f"warm follow-up {one['speedup_warm_vs_cold']:.1f}x faster than cold (cache: {one['cold']['cache']} -> "
        f"{one['warm_follow_up']['cache']}); cold == uncached: {one['cold_equals_uncached']}; "
        f"cache holds {one['cache_bytes'] / 2**20:.0f} MB; peak RSS {one['peak_rss_mb']:.0f} MB"
    )


if __name__ == "__main__":
    sys.exit(main())
