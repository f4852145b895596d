"""What zoom and regions cost, and how often zoom changes the answer (issue 21).

    python benchmarks/zoom.py                          # the aerial assets + a 20,000^2 synthetic COG
    python benchmarks/zoom.py --zoom 1,2 --questions 2 --no-synthetic --json

Zoom is our training-free addition (not the paper's): pass 1 answers over the whole scene, its
relevance proposes up to N windows, pass 2 answers from them at native resolution.

For each aerial image (`../shared/assets/aerial`) and question: the whole scene with zoom off,
then zoom N for each N: seconds of the whole question (both passes), the windows (pixels,
score, side), whether the answer differs from zoom off, and the peak RSS of the run. For the
synthetic scene (`tests/big_scene.py`: a 20,000 x 20,000 georeferenced COG with overviews): the
whole scene (read from its overviews) against a 2,000-px region (read at native resolution):
seconds and peak RSS, the cost of a region against the whole scene; and zoom 1 on it.

Random benchmark-size model of `benchmarks/pipeline.py` (CLIP 256x4, Qwen2 512x4), default
budgets, `topk` unless `--selector`, CPU, fp32, `--threads` (default 1), every question cold
(no scene cache). With a random model almost any change of the visual tokens changes the answer:
"answer changed" measures how often zoom hands the LLM other evidence, not whether it helps;
measure accuracy on a trained checkpoint. Peak RSS is sampled in-process (model and imports
included).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
AERIAL = ROOT.parent / "shared" / "assets" / "aerial"
IMAGES = ["neon_yell_2299x2472.png", "neon_yell_1249x1035.png", "neon_osbs_400.tif", "rmnp_rgb_geotiff.tif"]
QUESTIONS = ["How many trees are in the image?", "Where is the road?"]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))
from pipeline import PeakRSS, build_model  # noqa: E402


def run(pipe, mem: PeakRSS, image: str, question: str, **kw) -> tuple[object, float, float]:
    """One cold question: (result, seconds, peak RSS MB during it)."""
    mem.take()
    t = time.perf_counter()
    res = pipe.ask(image, question, max_new_tokens=8, **kw)
    return res, time.perf_counter() - t, mem.take()


def windows(res) -> list[dict]:
    return [
        {"pixels": list(w.pixels), "score": round(w.score, 3), "side": w.pixels[2] - w.pixels[0]}
        for w in (res.zoom.windows if res.zoom else [])
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", default=",".join(IMAGES), help="aerial asset file names, comma-separated")
    ap.add_argument("--questions", type=int, default=len(QUESTIONS), help=f"first N of {QUESTIONS}")
    ap.add_argument("--zoom", default="1", help="zoom levels, comma-separated (e.g. 1,2)")
    ap.add_argument("--selector", default="topk")
    ap.add_argument("--budgets", default="80,320,600,2000")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-synthetic", action="store_true", help="skip the 20,000^2 COG")
    ap.add_argument("--size", type=int, default=20000, help="side of the synthetic COG")
    ap.add_argument("--window", type=int, default=2000, help="side of its region")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    levels = [int(z) for z in args.zoom.split(",")]
    questions = QUESTIONS[: args.questions]

    from uhrbat.pipeline import UhrBatPipeline

    mem = PeakRSS()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="uhrbat-zoom-") as tmp:
        model_args = argparse.Namespace(
            llm_width=512, llm_layers=4, llm_heads=8, llm_kv_heads=2, clip_width=256, clip_layers=4
        )
        pipe = UhrBatPipeline.from_pretrained(
            build_model(model_args, Path(tmp) / "model"),
            budgets=[int(b) for b in args.budgets.split(",")],
            selector=args.selector,
            scene_cache=False,  # every question cold: both passes read, tile and encode
        )
        pipe.model.config.max_context = pipe.processor.max_context = 100_000
        scenes = [(name, str(AERIAL / name)) for name in args.images.split(",") if name]
        if not args.no_synthetic:
            from big_scene import build_cog

            cog = Path(tmp) / f"scene_{args.size}_cog.tif"
            print(f"writing a {args.size}^2 COG with overviews ...", file=sys.stderr, flush=True)
            build_cog(cog, args.size)
            scenes.append((cog.name, str(cog)))
        for name, path in scenes:
            for q in questions:
                base, t0, m0 = run(pipe, mem, path, q)
                row = {"image": name, "question": q, "size": list(base.image_size), "zoom_off_s": round(t0, 2)}
                row["zoom_off_peak_mb"] = round(m0)
                for z in levels:
                    res, t, m = run(pipe, mem, path, q, zoom=z)
                    row[f"zoom{z}"] = {
                        "seconds": round(t, 2),
                        "x_zoom_off": round(t / t0, 2),
                        "peak_mb": round(m),
                        "windows": windows(res),
                        "answer_changed": res.answer != base.answer,
                        "pass1_equals_zoom_off": res.zoom.scene.answer == base.answer,
                    }
                if name.startswith("scene_"):  # the cost of a region against the whole scene
                    x0 = y0 = (args.size - args.window) // 2 + 123
                    box = [x0, y0, x0 + args.window, y0 + args.window]
                    res, t, m = run(pipe, mem, path, q, region=box)
                    row["region"] = {"pixels": box, "seconds": round(t, 2), "peak_mb": round(m)}
                    row["region"]["timings"] = {k: round(v, 2) for k, v in res.timings.items()}
                    row["zoom_off_timings"] = {k: round(v, 2) for k, v in base.timings.items()}
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps({"selector": args.selector, "threads": args.threads, "rows": rows}, indent=1))
        return
    print(f"selector {args.selector}, budgets {args.budgets}, {args.threads} thread(s), every question cold")
    head = "| image | question | zoom off (s) | " + " | ".join(
        f"zoom {z}: s (x off) | windows (side px, score) | answer changed" for z in levels
    )
    print(head + " |")
    print("|" + "---|" * (3 + 3 * len(levels)))
    for r in rows:
        cells = [r["image"], r["question"], f"{r['zoom_off_s']:.1f}"]
        for z in levels:
            d = r[f"zoom{z}"]
            shown = ", ".join(f"{w['side']} ({w['score']:.2f})" for w in d["windows"]) or "none"
            cells += [f"{d['seconds']:.1f} ({d['x_zoom_off']:.2f}x)", shown, "yes" if d["answer_changed"] else "no"]
        print("| " + " | ".join(cells) + " |")
    for z in levels:
        changed = sum(r[f"zoom{z}"]["answer_changed"] for r in rows)
        print(f"zoom {z}: answer changed in {changed} of {len(rows)} questions")
    for r in rows:
        if "region" in r:
            g = r["region"]
            whole = f"whole scene {r['zoom_off_s']:.1f} s, peak {r['zoom_off_peak_mb']} MB"
            region = f"{args.window}-px region {g['seconds']:.1f} s, peak {g['peak_mb']} MB"
            print(f"{r['image']} ({r['question']}): {whole}; {region}")


if __name__ == "__main__":
    main()
