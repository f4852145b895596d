"""Training: the kept rows of a selection re-projected with gradient.

Selection runs without gradient; only the rows that reach the LLM (kept tokens and the members
of merged groups) are projected again from the frozen CLIP features, so activation memory
follows the budget, not the 131k candidates.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from uhrbat.compression.types import Selection

__all__ = ["needs_gradient", "rows_with_grad"]


def needs_gradient(model: Any) -> bool:
    """True when gradient is on and the projector or the scale residuals are trainable."""
    return torch.is_grad_enabled() and any(
        p.requires_grad for m in (model.projector, model.scale_residuals) for p in m.parameters()
    )


def rows_with_grad(model: Any, clip_flat: Tensor, scale: int, sel: Selection) -> Tensor:
    """Recompute the selected rows of `scale` with gradient from its CLIP features `[N, C]`.

    Returns `[n, H]`: each row the mean of its members' projector output (+ the scale residual
    twice when `config.enable_scale_pos_residual`), accumulated in float32.
    """
    n = len(sel)
    dev = clip_flat.device
    counts = (sel.offsets[1:] - sel.offsets[:-1]).to(dev)
    pos = sel.positions.to(dev)
    x = model.projector(clip_flat.index_select(0, pos).to(model.projector.fc1.weight.dtype))
    if model.config.enable_scale_pos_residual:
        r = model.scale_residuals(scale).to(x.dtype)[pos % model.config.tokens_per_tile]
        x = (x + r) + r
    row_of_member = torch.repeat_interleave(torch.arange(n, device=dev), counts)
    sums = torch.zeros(n, x.shape[-1], device=dev, dtype=torch.float32).index_add(0, row_of_member, x.float())
    return (sums / counts.unsqueeze(-1).float()).to(x.dtype)
