"""Result containers shared by the compression functions."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Selection:
    """Tokens chosen for one scale of one image.

    Rows are in emission order (groups by descending relevance; inside a group the kept
    tokens by descending relevance, then the group's merged token).

    Attributes:
        embeds: `[n, D]` selected token embeddings (a merged row is the mean of its members).
        positions: `[M]` int64 flat token positions (tile * 576 + row * 24 + col), CSR values.
        offsets: `[n + 1]` int64 CSR offsets into `positions`; row i has
            `positions[offsets[i]:offsets[i+1]]` as members.
        merged: `[n]` bool, True for a row that averages a group's below-mean members.
        scores: `[n]` float64 relevance (own score, or mean relevance of the averaged members).
        group: `[n]` int64 group id (cluster / segment) of merged rows, -1 for single rows.
    """

    embeds: torch.Tensor
    positions: torch.Tensor
    offsets: torch.Tensor
    merged: torch.Tensor
    scores: torch.Tensor
    group: torch.Tensor

    def __len__(self) -> int:
        return int(self.merged.numel())
