"""Activation memory of one UHR-BAT training step: budget-bound vs "project all 131k tokens with grad".

Measures, on a random tiny model (CLIP 32x3, Qwen2 64x2 by default) with the paper's pyramid
(672/1344/2688/4032 px = 228 tiles = 131,328 candidate tokens), the bytes of every tensor autograd
saves for the backward pass during one training forward (deduplicated by storage; this is the
activation memory, independent of allocator noise and exact on CPU), for:

* **ours** (`UhrBatForConditionalGeneration`): tiles encoded once without gradient, selection
  without gradient, then only the selected rows (kept tokens + members of merged groups) are
  re-projected with gradient;
* **naive** (the reference's training path, §8): the projector (+ scale residual) runs with
  gradient over all candidate tokens of every scale and the selection gathers from that graph.

Two sweeps: the budget (paper budgets 80/320/600/2000 and multiples) on the full pyramid, and the
pyramid (2, 3, 4 scales) at fixed budgets. With `--device cuda`, the peak CUDA memory of the step
(forward + backward) is reported too.

    python benchmarks/train_memory.py                      # tiny model, CPU, K-Means (600 clusters)
    python benchmarks/train_memory.py --selector topk      # faster
    python benchmarks/train_memory.py --hidden 512 --clip-hidden 256 --device cuda
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

PAPER_SCALES = [672, 1344, 2688, 4032]
PAPER_BUDGETS = [80, 320, 600, 2000]
# Bytes autograd keeps per projected row at the paper's sizes (CLIP 1024 -> 3584 -> GELU -> 3584,
# bf16): the projector input, fc1 output and GELU output.
PAPER_ROW_BYTES = (1024 + 3584 + 3584) * 2


class SavedTensorMeter:
    """Sums the storage bytes of tensors saved for backward (each storage counted once)."""

    def __init__(self) -> None:
        self.storages: dict[int, int] = {}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        try:
            st = t.untyped_storage()
            self.storages[st.data_ptr()] = max(self.storages.get(st.data_ptr(), 0), st.nbytes())
        except (RuntimeError, NotImplementedError):
            self.storages[id(t)] = t.numel() * t.element_size()
        return t

    @staticmethod
    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())


def naive_rows_with_grad(self, clip_flat: torch.Tensor, scale: int, sel) -> torch.Tensor:
    """The reference's way: project every candidate token of the scale with gradient, then gather."""
    x = self.projector(clip_flat.to(self.projector.fc1.weight.dtype))
    if self.config.enable_scale_pos_residual:
        r = self.scale_residuals(scale).to(x.dtype)
        r = r.repeat(x.shape[0] // r.shape[0], 1)
        x = (x + r) + r
    n = len(sel)
    counts = (sel.offsets[1:] - sel.offsets[:-1]).to(x.device)
    rows = x.index_select(0, sel.positions.to(x.device))
    owner = torch.repeat_interleave(torch.arange(n, device=x.device), counts)
    sums = torch.zeros(n, x.shape[-1], device=x.device, dtype=torch.float32).index_add(0, owner, rows.float())
    return (sums / counts.unsqueeze(-1).float()).to(x.dtype)


def build(scales: list[int], budgets: list[int], args: argparse.Namespace, root: Path):
    from uhrbat.modeling.loading import load
    from uhrbat.training.testing import make_images, make_tiny_training_checkpoint

    ck = make_tiny_training_checkpoint(
        root / f"ck-{len(scales)}", scales=scales, budgets=budgets, hidden=args.hidden, clip_hidden=args.clip_hidden
    )
    model, proc = load(ck, device=args.device)
    if not args.no_gc:
        from uhrbat.training.freeze import enable_gradient_checkpointing

        enable_gradient_checkpointing(model)  # as the recipe: activation checkpointing on the LLM
    model.config.text_config.use_cache = False
    model.train()
    img = make_images(root / "img", 1, size=(args.image, args.image))[0]
    return model, proc, img


def one_step(model, proc, img, budgets: list[int], args: argparse.Namespace, naive: bool) -> dict:
    from uhrbat.modeling.modeling_uhrbat import UhrBatForConditionalGeneration
    from uhrbat.training.collator import UhrBatCollator
    from uhrbat.training.data import Sample
    from uhrbat.training.dataset import SftDataset

    msgs = [
        {"role": "user", "content": "<image>\nHow many storage tanks are there?"},
        {"role": "assistant", "content": "There are three storage tanks near the road."},
    ]
    ds = SftDataset([Sample("b", str(img), msgs)], proc, budgets, max_length=None)
    sel = {"selector": args.selector, "seed": 0}
    if args.selector == "kmeans":
        sel.update(kmeans_clusters=args.clusters, kmeans_iters=args.iters)
    batch = UhrBatCollator(proc.tokenizer.pad_token_id, budgets, selection=sel)([ds[0]])
    batch = {k: v.to(args.device) if torch.is_tensor(v) else v for k, v in batch.items()}
    original = UhrBatForConditionalGeneration._rows_with_grad
    if naive:
        UhrBatForConditionalGeneration._rows_with_grad = naive_rows_with_grad
    rows = {"n": 0}

    def count_rows(self, clip_flat, scale, s):
        rows["n"] += int(s.positions.numel()) if not naive else int(clip_flat.shape[0])
        return (naive_rows_with_grad if naive else original)(self, clip_flat, scale, s)

    UhrBatForConditionalGeneration._rows_with_grad = count_rows
    meter = SavedTensorMeter()
    model.zero_grad(set_to_none=True)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    try:
        with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
            loss = model(**batch).loss
        loss.backward()
    finally:
        UhrBatForConditionalGeneration._rows_with_grad = original
    out = {
        "saved_MB": meter.bytes / 2**20,
        "rows_with_grad": rows["n"],
        "seconds": time.perf_counter() - t0,
        "loss": loss.item(),
    }
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        out["cuda_peak_MB"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--selector", default="kmeans", choices=["kmeans", "topk"])
    ap.add_argument("--clusters", type=int, default=600, help="K-Means clusters per scale (paper: 600).")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--hidden", type=int, default=64, help="LLM hidden size of the random model (paper: 3584).")
    ap.add_argument("--clip-hidden", type=int, default=32, help="CLIP hidden size (paper: 1024).")
    ap.add_argument("--image", type=int, default=512, help="Side of the generated test image.")
    ap.add_argument("--multiples", default="0.25,0.5,1,2", help="Budget multiples of 80/320/600/2000 to sweep.")
    ap.add_argument(
        "--no-gc", action="store_true", help="Disable the LLM's activation checkpointing (on in the recipe)."
    )
    ap.add_argument("--json", type=Path, default=None, help="Also write the figures here.")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    results: dict = {"config": vars(args) | {"json": None}, "budget_sweep": [], "pyramid_sweep": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model, proc, img = build(PAPER_SCALES, PAPER_BUDGETS, args, root)
        n_tokens = sum(model.config.num_tokens(s) for s in PAPER_SCALES)
        print(
            f"tiny model: CLIP {args.clip_hidden}x{model.config.vision_config.num_hidden_layers}, "
            f"Qwen2 {args.hidden}x{model.config.text_config.num_hidden_layers}; pyramid {PAPER_SCALES} = "
            f"{n_tokens:,} candidate tokens; selector {args.selector}"
            + (f" (K={args.clusters}, {args.iters} iters)" if args.selector == "kmeans" else "")
            + f"; LLM activation checkpointing {'off' if args.no_gc else 'on'}; {args.device}"
        )
        print("\nBudget sweep (full pyramid): activation memory saved for backward, MB")
        print(
            f"{'budgets':>24} {'visual':>7} | {'ours':>9} {'rows':>7} | {'naive':>9} {'rows':>8} | {'naive/ours':>10}"
            f" | projector path at paper dims, bf16 (estimate): ours / naive"
        )
        for m in [float(x) for x in args.multiples.split(",")]:
            budgets = [max(1, int(round(b * m))) for b in PAPER_BUDGETS]
            ours = one_step(model, proc, img, budgets, args, naive=False)
            naive = one_step(model, proc, img, budgets, args, naive=True)
            assert abs(ours["loss"] - naive["loss"]) < 1e-3 * max(1.0, abs(ours["loss"])), (ours, naive)
            vis = proc.num_visual_tokens(budgets)
            row = {"budgets": budgets, "visual_tokens": vis, "ours": ours, "naive": naive}
            results["budget_sweep"].append(row)
            print(
                f"{str(budgets):>24} {vis:>7} | {ours['saved_MB']:>9.1f} {ours['rows_with_grad']:>7} | "
                f"{naive['saved_MB']:>9.1f} {naive['rows_with_grad']:>8} | "
                f"{naive['saved_MB'] / ours['saved_MB']:>9.1f}x"
                f" | {ours['rows_with_grad'] * PAPER_ROW_BYTES / 2**20:>8.0f} MB / "
                f"{naive['rows_with_grad'] * PAPER_ROW_BYTES / 2**30:.2f} GB"
                + (
                    f"   cuda peak {ours['cuda_peak_MB']:.0f} vs {naive['cuda_peak_MB']:.0f} MB"
                    if "cuda_peak_MB" in ours
                    else ""
                )
            )
        del model
        print("\nPyramid sweep at a fixed budget (80 + 320 tokens; 0 at the larger scales): activation MB")
        print(f"{'scales':>24} {'tokens':>8} | {'ours':>9} | {'naive':>9}")
        for k in (2, 3, 4):
            scales = PAPER_SCALES[:k]
            budgets = PAPER_BUDGETS[:2] + [0] * (k - 2)
            m2, p2, img2 = build(scales, budgets, args, root)
            ours = one_step(m2, p2, img2, budgets, args, naive=False)
            naive = one_step(m2, p2, img2, budgets, args, naive=True)
            toks = sum(m2.config.num_tokens(s) for s in scales)
            results["pyramid_sweep"].append(
                {"scales": scales, "budgets": budgets, "tokens": toks, "ours": ours, "naive": naive}
            )
            print(f"{str(scales):>24} {toks:>8,} | {ours['saved_MB']:>9.1f} | {naive['saved_MB']:>9.1f}")
            del m2
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
