"""Plain result records returned by the high-level API (`uhrbat.pipeline`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class KeptToken:
    """One visual token the LLM saw.

    `tile` is the row-major tile index at `scale`, (`row`, `col`) the 14-px patch inside that
    336-px tile. For a merged token these describe its first member; `members` lists every
    member as flat positions (tile * 576 + row * 24 + col) at that scale.
    """

    scale: int
    tile: int
    row: int
    col: int
    score: float
    merged: bool
    group: int
    members: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class AskResult:
    """The answer to one question about one image, with what the model kept and timings.

    `timings` holds seconds per stage: load, tiles, encode, score, select, prefill, decode.
    `image_size` is the original (width, height); `relevance` (optional) maps scale ->
    `[tiles, 24, 24]` float tensor of relevance.
    """

    answer: str
    tokens: list[KeptToken]
    timings: dict[str, float]
    num_visual_tokens: int
    image_size: tuple[int, int]
    scales: list[int]
    generated_ids: list[int] = field(default_factory=list)
    relevance: dict[int, Any] | None = None
    timings_detail: dict[str, float] = field(default_factory=dict)  # sub-stages, e.g. "group" (K-Means) within "select"

    def to_dict(self, with_tokens: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "answer": self.answer,
            "num_visual_tokens": self.num_visual_tokens,
            "image_size": list(self.image_size),
            "scales": list(self.scales),
            "timings": dict(self.timings),
        }
        if with_tokens:
            out["tokens"] = [t.to_dict() for t in self.tokens]
        return out
