"""Diversity selectors: `divprune` (max-min diversity, CVPR'25) and `dpp` (conditional DPP with
relevance as quality, CDPruner-style), adapters to `uhrbat.compression.divprune` / `.dpp`.

Neither has a query-independent grouping step or merged rows: every kept row is one token.
Candidates are passed in their own order (tiles ascending, patches row-major), so ties broken by
candidate index are ties broken by position, gated or not.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from uhrbat.compression.divprune import select_divprune
from uhrbat.compression.dpp import select_dpp
from uhrbat.compression.types import Selection
from uhrbat.selectors import register_selector
from uhrbat.selectors.base import ScaleTokens, SelectorBase

__all__ = ["DivPruneSelector", "DPPSelector"]


@register_selector("divprune")
class DivPruneSelector(SelectorBase):
    def select(
        self, tokens: ScaleTokens, relevance: Tensor, budget: int, options: Any, groups: Any = None, mask: Any = None
    ) -> Selection:
        return select_divprune(tokens.embeds, relevance, budget)


@register_selector("dpp")
class DPPSelector(SelectorBase):
    def select(
        self, tokens: ScaleTokens, relevance: Tensor, budget: int, options: Any, groups: Any = None, mask: Any = None
    ) -> Selection:
        return select_dpp(tokens.embeds, relevance, budget)
