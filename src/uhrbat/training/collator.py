"""Batch collation for SFT: padding (right or left), labels, query positions and tiles."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from uhrbat.training.tokenize import IGNORE_INDEX


@dataclass
class UhrBatCollator:
    """Pads `SftDataset` items into one model batch.

    The batch holds `input_ids`, `attention_mask`, `labels` (-100 on padding), `query_index`
    (the relevance query of each row, shifted for left padding), `pixel_values` `[B, T, 3, 336, 336]`,
    `image_masks` (list of per-image mask dicts, or None when no sample has one), `budgets`, and
    the selection options (`selector`, `kmeans_clusters`, `kmeans_iters`, `seed`, ...) which the
    model's forward consumes.
    """

    pad_token_id: int
    budgets: Sequence[int]
    padding_side: str = "right"
    selection: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be left or right, got {self.padding_side!r}")

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        longest = max(f["input_ids"].numel() for f in features)
        b = len(features)
        ids = torch.full((b, longest), int(self.pad_token_id), dtype=torch.long)
        labels = torch.full((b, longest), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((b, longest), dtype=torch.long)
        query = torch.zeros(b, dtype=torch.long)
        for i, f in enumerate(features):
            n = f["input_ids"].numel()
            off = longest - n if self.padding_side == "left" else 0
            ids[i, off : off + n] = f["input_ids"]
            labels[i, off : off + n] = f["labels"]
            mask[i, off : off + n] = 1
            query[i] = int(f["query_index"]) + off
        masks = [f.get("image_masks") for f in features]
        batch: dict[str, Any] = {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": labels,
            "query_index": query,
            "pixel_values": torch.stack([f["pixel_values"] for f in features]),
            "image_masks": masks if any(m is not None for m in masks) else None,
            "budgets": list(self.budgets),
        }
        batch.update(self.selection)
        return batch
