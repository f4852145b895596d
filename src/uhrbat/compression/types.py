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

    @classmethod
    def empty(cls, embeds: torch.Tensor) -> Selection:
        """No rows, in the dtype and on the device of `embeds` `[N, D]`."""
        dev = embeds.device
        return cls(
            embeds=embeds.new_empty(0, embeds.shape[1]),
            positions=torch.empty(0, dtype=torch.int64, device=dev),
            offsets=torch.zeros(1, dtype=torch.int64, device=dev),
            merged=torch.empty(0, dtype=torch.bool, device=dev),
            scores=torch.empty(0, dtype=torch.float64, device=dev),
            group=torch.empty(0, dtype=torch.int64, device=dev),
        )
