"""Building blocks of the UHR-BAT model: the 2-layer MLPs, the per-scale residual grids, and
`run_until` (a forward pass stopped before a given submodule)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from uhrbat.configuration import UhrBatConfig

__all__ = ["MLP2x", "ScaleResidual", "run_until"]


class _Stop(Exception):
    """Raised by a forward pre-hook to end a forward pass early."""


def run_until(module: nn.Module, stop_at: nn.Module, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, dict[str, Any]]:
    """Run `module(*args, **kwargs)` until `stop_at` is about to run; return its input.

    Returns `(hidden_states, kwargs_of_stop_at)`. This keeps the library's own forward
    (masks, rotary, layer loop) while skipping everything from `stop_at` on.
    """
    captured: dict[str, Any] = {}

    def hook(_m: nn.Module, a: tuple, kw: dict) -> None:
        captured["hidden"] = a[0] if a else kw["hidden_states"]
        captured["kwargs"] = kw
        raise _Stop

    handle = stop_at.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        module(*args, **kwargs)
    except _Stop:
        pass
    finally:
        handle.remove()
    if "hidden" not in captured:
        raise RuntimeError(f"{type(stop_at).__name__} was never reached")
    return captured["hidden"], captured["kwargs"]


class MLP2x(nn.Module):
    """Linear -> GELU (exact) -> Linear; the `mlp2x_gelu` projector and the token MLP."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_out)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(d_out, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ScaleResidual(nn.Module):
    """One learnable `[1, g*g, H]` grid per scale, bilinearly resized to the tile's token grid.

    Registered eagerly with shapes from the config so that loading is strict (the reference
    created them lazily and silently re-randomised them when they were not loaded, §7.4).
    """

    def __init__(self, config: UhrBatConfig) -> None:
        super().__init__()
        hidden = config.text_config.hidden_size
        self.tokens_per_side = config.tokens_per_side
        self.grids = nn.ParameterDict(
            {str(s): nn.Parameter(torch.zeros(1, config.residual_grid(s) ** 2, hidden)) for s in config.scales}
        )

    def forward(self, scale: int) -> torch.Tensor:
        """`[tokens_per_tile, H]` residual added to every tile of `scale` (row-major patches)."""
        p = self.grids[str(scale)]
        g = int(round(p.shape[1] ** 0.5))
        t = self.tokens_per_side
        grid = p.reshape(1, g, g, -1).permute(0, 3, 1, 2)
        r = F.interpolate(grid, size=(t, t), mode="bilinear", align_corners=False)
        return r.permute(0, 2, 3, 1).reshape(t * t, -1)
