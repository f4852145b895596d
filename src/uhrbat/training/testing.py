"""Tiny training fixtures (no downloads): a random checkpoint with a small pyramid, generated
images and a manifest. Used by the training tests and `benchmarks/train_memory.py`."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


def make_tiny_training_checkpoint(
    path: str | os.PathLike,
    scales: Sequence[int] = (336, 672, 1008),
    budgets: Sequence[int] = (4, 8, 8),
    seed: int = 0,
    **overrides: Any,
) -> Path:
    """`uhrbat.testing.make_tiny_checkpoint` with a small pyramid (fast on CPU)."""
    from uhrbat.testing import make_tiny_checkpoint

    base = overrides.pop("base_scale", 672 if 672 in scales else scales[0])
    return make_tiny_checkpoint(
        path, seed=seed, scales=list(scales), budgets=list(budgets), base_scale=base, **overrides
    )


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


def make_tiny_training_setup(
    root: str | os.PathLike,
    n: int = 8,
    scales: Sequence[int] = (336, 672, 1008),
    budgets: Sequence[int] = (4, 8, 8),
    seed: int = 0,
) -> TinySetup:
    """Checkpoint + `n` generated images + a validated manifest under `root`."""
    from uhrbat.training.data import prepare_sft

    root = Path(root)
    ck = make_tiny_training_checkpoint(root / "ckpt", scales=scales, budgets=budgets, seed=seed)
    images = make_images(root / "images", n, seed=seed)
    rows = [
        {
            "id": f"s{i}",
            "image": p.name,
            "conversations": [
                {"from": "human", "value": "<image>\n" + QUESTIONS[i % len(QUESTIONS)]},
                {"from": "gpt", "value": ANSWERS[i % len(ANSWERS)]},
            ],
        }
        for i, p in enumerate(images)
    ]
    src = root / "images" / "sft.json"
    src.write_text(json.dumps(rows))
    manifest = root / "train.jsonl"
    report = prepare_sft([src], manifest, scales=scales)
    if report.skipped:
        raise RuntimeError(f"tiny setup produced bad rows: {report.bad}")
    return TinySetup(ck, manifest, images)


def engine_smoke(*runs: Sequence[str]) -> None:
    """`uhrbat train RUN` for each run, in this process, for engine tests.

    Sets single-process distributed env defaults and skips DeepSpeed's shared-memory comm op (a
    ~2-minute JIT build that a one-process CPU run does not use). Use a fresh interpreter, and put
    a ZeRO-3 run last (its global config makes later model loads partitioned):
    `python -c "from uhrbat.training.testing import engine_smoke; engine_smoke([...], [...])"`.
    """
    for k, v in {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29517",
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
    }.items():
        os.environ.setdefault(k, v)
    try:
        import importlib

        # (not `import deepspeed.comm.torch as m`: that name resolves to the `torch` package)
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    except ImportError:
        pass
    from uhrbat.cli.main import main

    for argv in runs:
        try:
            main(["train", *argv])
        except SystemExit as e:
            if e.code:
                raise
