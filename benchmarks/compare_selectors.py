"""Every registered selector x encode mode (full, gated) at the same budgets: cost and agreement.

    python benchmarks/compare_selectors.py                   # both aerial images, every selector
    python benchmarks/compare_selectors.py --images 1 --selectors topk --repeat 3
    python benchmarks/compare_selectors.py --masks DIR       # + segments (DIR/<image stem>.safetensors)
    python benchmarks/compare_selectors.py --json

(Not `selectors.py`: run as a script, that file would shadow the standard library's `selectors`
module for every script in this folder.)

Each question is cold (no scene cache: the image is read, its tiles resized and encoded, K-Means
run), on the random benchmark-size model of `benchmarks/pipeline.py` (CLIP 256x4, Qwen2 512x4),
CPU, fp32, 1 thread by default. For each image and selector, the full and gated questions are
interleaved (full, gated, full, gated, ...: both see the same machine load) and the medians
of `--repeat` runs are reported:

* **tiles**: tiles encoded for the question, of the pyramid's 228 (672-4032);
* **kept**: visual tokens given to the LLM;
* **GFLOPs**: estimated multiply-adds x 2 of the vision tower + projector (per tile, counted by
  `torch.utils.flop_counter` on one tile, x tiles encoded) and of the LLM's two prompt passes -
  the scoring pass (text + base scale) and the answer's prefill (text + kept tokens) -, counted
  on the decoder layers at two short lengths and extrapolated (linear + quadratic in the rows);
* **seconds per stage** (`AskResult.timings`: read = load + tiles; K-Means "group" split out of
  "select"; gated fine tiles are resized and encoded inside "encode"), the question's wall time
  and its process CPU time (less sensitive to other jobs on a shared machine);
* **x full**: for gated rows, the median over runs of full / gated wall time, and of full / gated
  process CPU time (the pairs run back to back);
* **agreement with full K-Means** (the method's default; the first full `kmeans` run of the
  image): IoU of the positions kept as single rows, and of every position the LLM saw (merged
  rows' members included), per scale then averaged over the scales; whether the answer ids are
  the same. With a random model any change of visual tokens changes the answer, so answer
  agreement says little here; measure it on a trained checkpoint.

`segments` needs SAM masks (`uhrbat masks`); without `--masks` it is skipped with a note.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from gate_margin import AERIAL, BENCHMARK_MODEL, IMAGES, QUESTIONS, benchmark_pipeline, covered, iou, kept

STAGES = ("read", "encode", "score", "group", "select", "prefill", "decode")


# ----------------------------------------------------------------------------- agreement
def same_tokens(a: Any, b: Any) -> bool:
    return [t.to_dict() for t in a.tokens] == [t.to_dict() for t in b.tokens]


def mean_iou(ref: Any, res: Any, which: Any, scales: list[int]) -> float:
    return sum(iou(which(ref, s), which(res, s)) for s in scales) / len(scales)


# ----------------------------------------------------------------------------- FLOPs
class FlopModel:
    """Estimated FLOPs of one tile through the vision tower + projector, and of `n` rows through
    the LLM's decoder layers (`torch.utils.flop_counter.FlopCounterMode`; attention counted on
    PyTorch's math path, dense: the CPU flash kernel that runs is not in the counter's table)."""

    def __init__(self, model: Any) -> None:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.utils.flop_counter import FlopCounterMode

        def count(fn: Any) -> int:
            with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
                fn()
            return fc.get_total_flops()

        tile = model.config.tile_size
        self.per_tile = count(lambda: model.encode_tiles(torch.zeros(1, 3, tile, tile)))
        decoder, width = model.language_model.model, model.language_model.config.hidden_size
        n1, n2 = 64, 128
        f1, f2 = (count(lambda n=n: decoder(inputs_embeds=torch.zeros(1, n, width), use_cache=False)) for n in (n1, n2))
        # f(n) = a n + b n^2 (linear layers + attention), solved from the two lengths.
        self.b = (f2 / n2 - f1 / n1) / (n2 - n1)
        self.a = f1 / n1 - self.b * n1

    def llm(self, rows: int) -> float:
        return self.a * rows + self.b * rows * rows


# ----------------------------------------------------------------------------- one question
def run_one(pipe: Any, image: Path, question: str, selector: str, encode: str, args: Any, masks: Any) -> dict:
    t, c = time.perf_counter(), time.process_time()
    res = pipe.ask(
        image,
        question,
        max_new_tokens=args.max_new_tokens,
        min_new_tokens=args.max_new_tokens,
        masks=masks,
        selector=selector,
        encode=encode,
    )
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    tm, group = res.timings, res.timings_detail.get("group", 0.0)
    stages = {
        "read": tm["load"] + tm["tiles"],
        "encode": tm["encode"],
        "score": tm["score"],
        "group": group,
        "select": tm["select"] - group,
        "prefill": tm["prefill"],
        "decode": tm["decode"],
    }
    return {"res": res, "stages": stages, "wall": wall, "cpu": cpu}


def summarise(runs: list[dict], ref: Any, flops: FlopModel, base_tokens: int, full: list[dict] | None) -> dict:
    """Medians of one configuration's runs and its agreement with `ref` (full K-Means) and, for a
    gated configuration, with `full` (the same selector's full runs, paired run by run)."""
    res = runs[-1]["res"]
    scales = list(res.scales)
    tiles = sum(v["encoded"] for v in res.tiles.values())
    visual = res.num_visual_tokens
    text = res.prompt_tokens - visual
    out = {
        "tiles": tiles,
        "tiles_total": sum(v["total"] for v in res.tiles.values()),
        "tiles_per_scale": {s: v["encoded"] for s, v in res.tiles.items()},
        "kept": visual,
        "gflops_vision": tiles * flops.per_tile / 1e9,
        "gflops_llm": (flops.llm(text + base_tokens) + flops.llm(res.prompt_tokens)) / 1e9,
        "seconds": {k: statistics.median(r["stages"][k] for r in runs) for k in STAGES},
        "wall": statistics.median(r["wall"] for r in runs),
        "cpu": statistics.median(r["cpu"] for r in runs),
        "iou_kept": mean_iou(ref, res, kept, scales),
        "iou_seen": mean_iou(ref, res, covered, scales),
        "same_ids": res.generated_ids == ref.generated_ids,
        "runs": len(runs),
    }
    if full is not None:  # gated against full with the same selector
        out["x_full"] = statistics.median(f["wall"] / r["wall"] for f, r in zip(full, runs, strict=True))
        out["x_full_cpu"] = statistics.median(f["cpu"] / r["cpu"] for f, r in zip(full, runs, strict=True))
        other = full[-1]["res"]
        out["same_as_full"] = same_tokens(res, other) and res.generated_ids == other.generated_ids
    # Every run of a configuration must select the same tokens (the harness compares one of them).
    out["stable"] = all(same_tokens(r["res"], res) for r in runs)
    return out


def table(rows: list[dict]) -> str:
    head = (
        "| selector | encode | tiles | kept | GFLOPs vision | GFLOPs LLM | "
        + " | ".join(f"{k} s" for k in STAGES)
        + " | total s | CPU s | x full (wall / CPU) | = full | IoU kept | IoU seen | ids = full kmeans |"
    )
    lines = [head, "|---|---|" + "---:|" * (len(STAGES) + 11)]
    for r in rows:
        o = r["result"]
        x = f"{o['x_full']:.2f} / {o['x_full_cpu']:.2f}" if "x_full" in o else ""
        same = {True: "yes", False: "no", None: ""}[o.get("same_as_full")]
        lines.append(
            f"| {r['selector']} | {r['encode']} | {o['tiles']}/{o['tiles_total']} | {o['kept']} "
            f"| {o['gflops_vision']:.0f} | {o['gflops_llm']:.0f} | "
            + " | ".join(f"{o['seconds'][k]:.2f}" for k in STAGES)
            + f" | {o['wall']:.2f} | {o['cpu']:.2f} | {x} | {same} | {o['iou_kept']:.2f} | {o['iou_seen']:.2f} "
            f"| {'yes' if o['same_ids'] else 'no'} |"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", default="2", help="how many of the aerial images, or their file names (a,b)")
    ap.add_argument("--question", default=QUESTIONS[0])
    ap.add_argument("--selectors", default=None, help="comma-separated (default: every registered selector)")
    ap.add_argument("--encodes", default="full,gated")
    ap.add_argument("--budgets", default="80,320,600,2000")
    ap.add_argument("--kmeans-iters", type=int, default=10)
    ap.add_argument("--gate-margin", type=float, default=None, help="default: the vocabulary's")
    ap.add_argument("--masks", type=Path, default=None, help="folder of <image stem>.safetensors SAM masks")
    ap.add_argument("--repeat", type=int, default=1, help="timed runs per configuration (medians)")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from uhrbat.selectors import selector_names

    selectors = args.selectors.split(",") if args.selectors else list(selector_names())
    encodes = args.encodes.split(",")
    budgets = [int(b) for b in args.budgets.split(",")]
    defaults: dict[str, Any] = dict(budgets=budgets, kmeans_clusters=0, kmeans_iters=args.kmeans_iters)
    if args.gate_margin is not None:
        defaults["gate_margin"] = args.gate_margin
    with tempfile.TemporaryDirectory() as tmp:
        pipe = benchmark_pipeline(Path(tmp), **defaults)
    flops = FlopModel(pipe.model)
    cfg = pipe.model.config
    base_tokens = (cfg.base_scale // cfg.tile_size) ** 2 * cfg.tokens_per_side**2
    notes: list[str] = []
    report: dict[str, Any] = {
        "settings": {
            "budgets": budgets,
            "kmeans_clusters": "budget",
            "kmeans_iters": args.kmeans_iters,
            "gate_margin": pipe.resolve().gate_margin,
            "threads": args.threads,
            "repeat": args.repeat,
            "max_new_tokens": args.max_new_tokens,
            "model": BENCHMARK_MODEL,
        },
        "images": {},
        "notes": notes,
    }
    names = IMAGES[: int(args.images)] if args.images.isdigit() else args.images.split(",")
    for name in names:
        image = AERIAL / name
        masks = None
        if args.masks is not None and (args.masks / f"{image.stem}.safetensors").is_file():
            from uhrbat.compression.segments import load_mask_file

            masks = load_mask_file(args.masks / f"{image.stem}.safetensors")
        # Warm-up (allocator, kernels), then the reference: full K-Means.
        pipe.ask(image, args.question, max_new_tokens=2, selector="topk", encode="gated")
        ref = run_one(pipe, image, args.question, "kmeans", "full", args, None)["res"]
        rows = []
        for selector in selectors:
            if selector == "segments" and masks is None:
                notes.append(f"segments skipped on {name}: no masks (give --masks DIR with {image.stem}.safetensors)")
                continue
            runs: dict[str, list[dict]] = {e: [] for e in encodes}
            for _ in range(args.repeat):
                for encode in encodes:
                    runs[encode].append(run_one(pipe, image, args.question, selector, encode, args, masks))
                    last = runs[encode][-1]
                    print(f"{name} {selector} {encode}: {last['wall']:.2f} s", file=sys.stderr, flush=True)
            for encode in encodes:
                full = runs["full"] if encode != "full" and "full" in runs else None
                result = summarise(runs[encode], ref, flops, base_tokens, full)
                rows.append({"selector": selector, "encode": encode, "result": result})
        report["images"][name] = rows
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return 0
    s = report["settings"]
    print(
        f"budgets {args.budgets}, K-Means K = budget, <= {args.kmeans_iters} iterations, gate margin "
        f"{s['gate_margin']:g}; {args.threads} thread(s); medians of {args.repeat} cold run(s); "
        f"question {args.question!r}; {args.max_new_tokens} new tokens"
    )
    for name, rows in report["images"].items():
        print(f"\n{name}\n")
        print(table(rows))
    for n in notes:
        print(f"\nnote: {n}")
    unstable = [
        f"{name} {r['selector']} {r['encode']}"
        for name, rows in report["images"].items()
        for r in rows
        if not r["result"]["stable"]
    ]
    if unstable:
        print(f"\nnote: runs of one configuration selected different tokens: {', '.join(unstable)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
