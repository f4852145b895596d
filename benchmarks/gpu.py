"""UHR-BAT at the released dimensions on one GPU: per-stage time, peak memory, and fast K-Means
against the reference-style per-cluster loop.

    python benchmarks/gpu.py                     # CUDA, bf16, released dimensions (~16 GB of weights)
    python benchmarks/gpu.py --json gpu.json     # also write every figure as JSON
    python benchmarks/gpu.py --smoke             # tiny dimensions on the CPU in seconds (the test suite runs it)

The model has random weights at the released dimensions (CLIP ViT-L/14-336: 24 layers, 1024 wide,
penultimate layer; `mlp2x_gelu` projector 1024 -> 3584; Qwen2-7B: 28 layers, 3584 wide, 28 heads /
4 KV heads, MLP 18944, vocabulary 152,064; multiscale token MLP; scale residuals), built in bf16
directly on the device (no fp32 copy in host memory). Answers are meaningless; the work per
question is the real one. Measured, for the 2299x2472 NEON scene and a synthetic 8000x8000 one:

* at paper settings (budgets 80/320/600/2000, K = 600, <= 100 Lloyd iterations) and at K = budget;
* cold (no scene cache), a cached follow-up question (scene cache hit: encode and K-Means reused),
  and a batch of 4 different scenes (cold);
* per stage (tiles, encode, score, K-Means, select, prefill, decode), each boundary
  CUDA-synchronised (`time.perf_counter` is wrapped with `torch.cuda.synchronize` in this process);
  peak CUDA memory per run;
* K-Means alone at 4032 px (N = 82,944 tokens of the scene, 3586-wide features): the fast mode
  against the reference-style loop (`mode="exact"`: full `cdist`, then one masked mean per cluster
  with a host sync each) on the same device, seconds per Lloyd iteration.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
SCENE = ROOT.parent / "shared" / "assets" / "aerial" / "neon_yell_2299x2472.png"
QUESTIONS = [
    "How many trees are there?",
    "Is there a road?",
    "Describe the largest building.",
    "What covers most of the area?",
]
STAGES = ["tiles", "encode", "score", "group", "select", "prefill", "decode"]


@dataclass
class Dims:
    """Model and run sizes (released, or tiny for --smoke)."""

    clip_width: int = 1024
    clip_layers: int = 24
    clip_heads: int = 16
    clip_mlp: int = 4096
    llm_width: int = 3584
    llm_layers: int = 28
    llm_heads: int = 28
    llm_kv_heads: int = 4
    llm_mlp: int = 18944
    vocab: int = 152_064
    scales: tuple[int, ...] = (672, 1344, 2688, 4032)
    budgets: tuple[int, ...] = (80, 320, 600, 2000)
    paper_clusters: int = 600
    iters: int = 100
    synthetic_side: int = 8000
    loop_iters: int = 3  # reference-style loop iterations timed in the K-Means comparison


SMOKE = Dims(
    clip_width=32,
    clip_layers=3,
    clip_heads=4,
    clip_mlp=64,
    llm_width=64,
    llm_layers=2,
    llm_heads=4,
    llm_kv_heads=2,
    llm_mlp=160,
    vocab=1024,
    scales=(336, 672),
    budgets=(8, 16),
    paper_clusters=12,
    iters=10,
    synthetic_side=800,
    loop_iters=2,
)


# ----------------------------------------------------------------------------------- timing
def synchronised_clock(device: torch.device) -> None:
    """Make every `time.perf_counter()` in this process (the pipeline's stage clocks included)
    wait for the device first, so stage times are the device's, not the launch queue's."""
    if device.type != "cuda":
        return
    raw = time.perf_counter

    def clock() -> float:
        torch.cuda.synchronize(device)
        return raw()

    time.perf_counter = clock  # type: ignore[assignment]


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


# ------------------------------------------------------------------------------------ model
def build(dims: Dims, device: torch.device, dtype: torch.dtype, attn: str):
    """(model, processor) with random weights, created directly on `device` in `dtype`."""
    from uhrbat.configuration import UhrBatConfig
    from uhrbat.modeling.modeling_uhrbat import UhrBatForConditionalGeneration
    from uhrbat.processing.image_processing_uhrbat import UhrBatImageProcessor
    from uhrbat.processing.processing_uhrbat import UhrBatProcessor
    from uhrbat.testing import make_tiny_tokenizer

    tok = make_tiny_tokenizer()
    base_len = len(tok)
    tok.add_tokens(["<image>"], special_tokens=True)
    text = dict(
        model_type="qwen2",
        vocab_size=dims.vocab,
        hidden_size=dims.llm_width,
        intermediate_size=dims.llm_mlp,
        num_hidden_layers=dims.llm_layers,
        num_attention_heads=dims.llm_heads,
        num_key_value_heads=dims.llm_kv_heads,
        max_position_embeddings=32768,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    vision = dict(
        model_type="clip_vision_model",
        hidden_size=dims.clip_width,
        intermediate_size=dims.clip_mlp,
        num_hidden_layers=dims.clip_layers,
        num_attention_heads=dims.clip_heads,
        image_size=336,
        patch_size=14,
        hidden_act="quick_gelu",
        projection_dim=768,
    )
    cfg = UhrBatConfig(
        text_config=text,
        vision_config=vision,
        scales=list(dims.scales),
        budgets=list(dims.budgets),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vocab_in_use=base_len,
    )
    cfg.pad_token_id, cfg.eos_token_id = tok.pad_token_id, tok.eos_token_id
    cfg.max_context = 100_000
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):  # parameters are allocated on the device, in `dtype`
            model = UhrBatForConditionalGeneration(cfg)
    finally:
        torch.set_default_dtype(old)
    model.language_model.set_attn_implementation(attn)
    model.generation_config.eos_token_id = [tok.eos_token_id]
    model.generation_config.pad_token_id = tok.pad_token_id
    model.eval()
    ip = UhrBatImageProcessor(scales=cfg.scales, tile_size=cfg.tile_size, patch_size=cfg.patch_size)
    proc = UhrBatProcessor(ip, tok, budgets=cfg.budgets, max_context=cfg.max_context)
    return model, proc


def synthetic_scene(side: int, seed: int = 0):
    """A `side` x `side` RGB image: smooth fields, roads and roofs (no file, no download)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    low = rng.integers(40, 200, (side // 250 + 2, side // 250 + 2, 3), dtype=np.uint8)
    im = Image.fromarray(low).resize((side, side), Image.BILINEAR)
    d = ImageDraw.Draw(im)
    for _ in range(side // 40):
        x, y, w, h = (int(v) for v in rng.integers(0, side, 4) // np.array([1, 1, 20, 20]))
        d.rectangle([x, y, x + w + 8, y + h + 8], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    for _ in range(side // 400):
        d.line(
            [tuple(int(v) for v in rng.integers(0, side, 2)), tuple(int(v) for v in rng.integers(0, side, 2))],
            fill=(90, 90, 90),
            width=max(2, side // 300),
        )
    return im


def variants(image) -> list[Any]:
    """Four different scenes of the same size class (cold batch of 4)."""
    from PIL import Image

    return [
        image,
        image.transpose(Image.FLIP_LEFT_RIGHT),
        image.transpose(Image.FLIP_TOP_BOTTOM),
        image.transpose(Image.ROTATE_180),
    ]


# -------------------------------------------------------------------------------------- runs
def stage_times(res: Any) -> dict[str, float]:
    t = dict(res.timings)
    group = float(getattr(res, "timings_detail", {}).get("group", 0.0))
    out = {k: float(t.get(k, 0.0)) for k in STAGES}
    out["group"] = group
    out["select"] = max(0.0, float(t.get("select", 0.0)) - group)  # "select" includes K-Means
    return out


def make_pipeline(model: Any, proc: Any, cache: bool, **selection: Any) -> Any:
    """A pipeline over the already-built model with the scene cache on or off."""
    from uhrbat.pipeline import UhrBatPipeline

    return UhrBatPipeline(model, proc, scene_cache=cache, **selection)


def run_scene(
    model: Any,
    proc: Any,
    device: torch.device,
    scene_name: str,
    image: Any,
    setting: str,
    selection: dict[str, Any],
    max_new: int,
) -> list[dict[str, Any]]:
    rows = []
    kw = dict(max_new_tokens=max_new, min_new_tokens=max_new)
    cold = make_pipeline(model, proc, False, **selection)
    cold.ask(image, QUESTIONS[0], max_new_tokens=2)  # warm-up: kernels, allocator
    reset_peak(device)
    t = time.perf_counter()
    res = cold.ask(image, QUESTIONS[0], **kw)
    total = time.perf_counter() - t
    rows.append(
        dict(
            scene=scene_name,
            setting=setting,
            run="cold",
            batch=1,
            stages=stage_times(res),
            total=total,
            per_question=total,
            peak_gb=peak_gb(device),
            cache=res.cache,
        )
    )

    cached = make_pipeline(model, proc, True, **selection)
    cached.ask(image, QUESTIONS[0], **kw)  # fills the cache (miss)
    reset_peak(device)
    t = time.perf_counter()
    res = cached.ask(image, QUESTIONS[1], **kw)
    total = time.perf_counter() - t
    rows.append(
        dict(
            scene=scene_name,
            setting=setting,
            run="cached follow-up",
            batch=1,
            stages=stage_times(res),
            total=total,
            per_question=total,
            peak_gb=peak_gb(device),
            cache=res.cache,
        )
    )

    images = variants(image)
    reset_peak(device)
    t = time.perf_counter()
    out = cold.ask_batch(images, QUESTIONS, **kw)
    total = time.perf_counter() - t
    rows.append(
        dict(
            scene=scene_name,
            setting=setting,
            run="cold",
            batch=len(images),
            stages=stage_times(out[0]),
            total=total,
            per_question=total / len(images),
            peak_gb=peak_gb(device),
            cache="off",
            note="stages as reported for the first row of the batch",
        )
    )
    return rows


def kmeans_comparison(model: Any, proc: Any, image: Any, device: torch.device, dims: Dims) -> list[dict[str, Any]]:
    """Fast K-Means vs the reference-style loop on the scene's real 4032-px features."""
    from uhrbat.compression import clustering_features, kmeans

    cfg = model.config
    s = cfg.scales[-1]
    tiles, _ = proc.image_processor.pyramid(image)
    n_before = sum(cfg.num_tiles(x) for x in cfg.scales[:-1])
    with torch.no_grad():
        feats, _ = model.encode_tiles(tiles[n_before:].to(device))
        res = model.scale_residuals(s).to(feats.dtype)
        emb = ((feats + res) + res).reshape(-1, feats.shape[-1])
    x = clustering_features(emb, cfg.num_tiles(s), cfg.kmeans_feat_scale, cfg.kmeans_coord_scale, cfg.tokens_per_side)
    rows = []
    for k in (dims.paper_clusters, dims.budgets[-1]):
        t = time.perf_counter()
        fast = kmeans(x, k, dims.iters, generator=torch.Generator().manual_seed(0))
        t_fast = time.perf_counter() - t
        t = time.perf_counter()
        loop = kmeans(x, k, dims.loop_iters, generator=torch.Generator().manual_seed(0), mode="exact")
        t_loop = time.perf_counter() - t
        same1 = bool(torch.equal(fast.labels_iter1, loop.labels_iter1))
        rows.append(
            dict(
                scale=s,
                n=x.shape[0],
                k=k,
                features=x.shape[1],
                fast_iterations=fast.iterations,
                fast_seconds=t_fast,
                fast_per_iter=t_fast / fast.iterations,
                loop_iterations=loop.iterations,
                loop_seconds=t_loop,
                loop_per_iter=t_loop / loop.iterations,
                speedup=(t_loop / loop.iterations) / (t_fast / fast.iterations),
                same_first_labels=same1,
            )
        )
    return rows


# ------------------------------------------------------------------------------------ report
def fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def markdown(header: dict[str, Any], rows: list[dict[str, Any]], km_rows: list[dict[str, Any]]) -> str:
    lines = [
        f"**{header['device']}**, torch {header['torch']}, {header['dtype']}, LLM attention {header['attn']}, "
        f"{header['dims']}; {header['clock']}",
        "",
    ]
    cols = ["scene", "setting", "run", "batch", *STAGES, "total s", "s/question", "peak GB", "cache"]
    lines.append("| " + " | ".join(cols) + " |")
    lines.append("|" + "---|" * len(cols))
    for r in rows:
        st = r["stages"] or {}
        cells = [
            r["scene"],
            r["setting"],
            r["run"],
            str(r["batch"]),
            *(fmt(st.get(k)) for k in STAGES),
            fmt(r["total"]),
            fmt(r["per_question"]),
            fmt(r["peak_gb"], 1),
            r["cache"],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    notes = sorted({r["note"] for r in rows if r.get("note")})
    lines += [""] + [f"- {n}" for n in notes]
    lines += [
        "",
        "| K-Means at | N | K | features | fast: iterations | fast s | fast s/iter | reference loop s/iter "
        "| speedup | same first assignment |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in km_rows:
        lines.append(
            f"| {r['scale']} px | {r['n']} | {r['k']} | {r['features']} | {r['fast_iterations']} | "
            f"{fmt(r['fast_seconds'])} | {fmt(r['fast_per_iter'], 4)} | {fmt(r['loop_per_iter'], 4)} "
            f"({r['loop_iterations']} iterations) | {r['speedup']:.1f}x | {r['same_first_labels']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny dimensions on the CPU (seconds); checks the script runs")
    ap.add_argument("--device", default=None, help="default: cuda (cpu with --smoke)")
    ap.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"], help="default: bf16 (fp32 with --smoke)")
    ap.add_argument("--attn", default=None, help="LLM attention: sdpa, or flash_attention_2 (default when installed)")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--scene", default=str(SCENE))
    ap.add_argument("--json", default=None, help="write every figure here")
    args = ap.parse_args(argv)

    from PIL import Image

    from uhrbat.devices import resolve_device
    from uhrbat.modeling.loading import resolve_dtype

    dims = SMOKE if args.smoke else Dims()
    device = resolve_device(args.device or ("cpu" if args.smoke else "cuda"))
    dtype = resolve_dtype(args.dtype or ("fp32" if args.smoke else "bf16"), device)
    attn = args.attn or (
        "flash_attention_2" if device.type == "cuda" and importlib.util.find_spec("flash_attn") else "sdpa"
    )
    if args.smoke:
        torch.set_num_threads(1)
    synchronised_clock(device)
    t = time.perf_counter()
    model, proc = build(dims, device, dtype, attn)
    build_s = time.perf_counter() - t
    scenes = [
        ("2299x2472 NEON", Image.open(args.scene).convert("RGB")),
        (f"{dims.synthetic_side}x{dims.synthetic_side} synthetic", synthetic_scene(dims.synthetic_side)),
    ]
    settings = [
        (f"paper (K={dims.paper_clusters})", dict(kmeans_clusters=dims.paper_clusters)),
        ("K = budget", dict(kmeans_clusters=0)),
    ]
    rows: list[dict[str, Any]] = []
    for scene_name, image in scenes:
        for setting, sel in settings:
            selection = dict(budgets=list(dims.budgets), kmeans_iters=dims.iters, **sel)
            rows += run_scene(model, proc, device, scene_name, image, setting, selection, args.max_new_tokens)
    km_rows = kmeans_comparison(model, proc, scenes[0][1], device, dims)
    header = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke: 1 thread)",
        "torch": torch.__version__,
        "dtype": str(dtype).replace("torch.", ""),
        "attn": attn,
        "dims": "tiny smoke dimensions" if args.smoke else "released dimensions (random weights)",
        "clock": "stage boundaries CUDA-synchronised" if device.type == "cuda" else "CPU wall clock",
        "build_seconds": build_s,
        "max_new_tokens": args.max_new_tokens,
        "smoke": args.smoke,
        "dims_detail": dims.__dict__,
    }
    print(markdown(header, rows, km_rows))
    if args.json:
        Path(args.json).write_text(
            json.dumps({"header": header, "runs": rows, "kmeans": km_rows}, indent=2, default=str) + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
