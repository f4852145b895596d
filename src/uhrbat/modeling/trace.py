"""`ImageTrace`: what one image's pass through the model leaves behind for inspection (relevance,
selections, K-Means results, embeddings, timings) - read by `uhrbat trace`, `--json`, overlays
and tests; never needed to answer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from uhrbat.compression.types import Selection

__all__ = ["ImageTrace"]


@dataclass
class ImageTrace:
    """Intermediates of one image (kept for `uhrbat trace`, `--json` and overlays)."""

    relevance_base: torch.Tensor | None = None  # [N_base]
    relevance: dict[int, torch.Tensor] = field(default_factory=dict)  # scale -> [T, 24, 24]
    selections: dict[int, Selection] = field(default_factory=dict)
    kmeans: dict[int, Any] = field(default_factory=dict)
    pre_mlp: torch.Tensor | None = None
    post_mlp: torch.Tensor | None = None
    features: dict[int, torch.Tensor] = field(default_factory=dict)  # scale -> [T, 576, H] (+1 residual), optional
    clip_features: dict[int, torch.Tensor] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    want_clip: bool = False  # also keep CLIP and projected features of every scale (tracing)
