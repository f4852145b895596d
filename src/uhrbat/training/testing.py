"""Tiny training fixtures (no downloads): a random checkpoint with a small pyramid, generated
images and a manifest. Used by the training tests and `benchmarks/train_memory.py`."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

QUESTIONS = [
    "How many ships are in the harbour?",
    "Is there a red car in the parking lot?",
    "What is the colour of the roof?",
    "Describe where the pond is.",
]
ANSWERS = [
    "There are three ships near the pier.",
    "Yes, one red car is parked by the road.",
    "The roof is grey.",
    "The pond lies in the north west corner of the image.",
]


def make_tiny_training_checkpoint(path: str | os.PathLike, scales: Sequence[int] = (336, 672, 1008),
                                  budgets: Sequence[int] = (4, 8, 8), seed: int = 0, **overrides: Any) -> Path:
    """`uhrbat.testing.make_tiny_checkpoint` with a custom pyramid (processor config kept in sync)."""
    from uhrbat.testing import make_tiny_checkpoint

    base = overrides.pop("base_scale", 672 if 672 in scales else scales[0])
    p = make_tiny_checkpoint(path, seed=seed, scales=list(scales), budgets=list(budgets), base_scale=base, **overrides)
    # make_tiny_checkpoint writes the default pyramid into the processor config; align it.
    cfg_path = p / "preprocessor_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["scales"] = list(scales)
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    proc_path = p / "processor_config.json"
    pcfg = json.loads(proc_path.read_text())
    pcfg["budgets"] = list(budgets)
    proc_path.write_text(json.dumps(pcfg, indent=2) + "\n")
    return p


def make_images(folder: str | os.PathLike, n: int, seed: int = 0, size: tuple[int, int] = (90, 70)) -> list[Path]:
    """`n` small PNGs with a coloured square at a sample-dependent place (Pillow only)."""
    from PIL import Image, ImageDraw

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        w, h = size[0] + 7 * (i % 3), size[1] + 5 * (i % 4)
        arr = (rng.random((h, w, 3)) * 80 + 60).astype(np.uint8)
        im = Image.fromarray(arr)
        d = ImageDraw.Draw(im)
        x, y = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
        d.rectangle([x, y, x + 18, y + 18], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        p = folder / f"img_{i:03d}.png"
        im.save(p)
        out.append(p)
    return out


@dataclass
class TinySetup:
    checkpoint: Path
    manifest: Path
    images: list[Path]


def make_tiny_training_setup(root: str | os.PathLike, n: int = 8, scales: Sequence[int] = (336, 672, 1008),
                             budgets: Sequence[int] = (4, 8, 8), seed: int = 0) -> TinySetup:
    """Checkpoint + `n` generated images + a validated manifest under `root`."""
    from uhrbat.training.data import prepare_sft

    root = Path(root)
    ck = make_tiny_training_checkpoint(root / "ckpt", scales=scales, budgets=budgets, seed=seed)
    images = make_images(root / "images", n, seed=seed)
    rows = [
        {"id": f"s{i}", "image": p.name,
         "conversations": [{"from": "human", "value": "<image>\n" + QUESTIONS[i % len(QUESTIONS)]},
                           {"from": "gpt", "value": ANSWERS[i % len(ANSWERS)]}]}
        for i, p in enumerate(images)
    ]
    src = root / "images" / "sft.json"
    src.write_text(json.dumps(rows))
    manifest = root / "train.jsonl"
    report = prepare_sft([src], manifest, scales=scales)
    if report.skipped:
        raise RuntimeError(f"tiny setup produced bad rows: {report.bad}")
    return TinySetup(ck, manifest, images)
