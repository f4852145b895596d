"""The built-in selectors: `kmeans` and `segments` (preserve-and-merge over groups, method §4.1 and
§4.2) and `topk` (the most relevant tokens, one row each).

Each is a thin adapter from the `Selector` protocol to the pure functions of
`uhrbat.compression`; the grouping step of `kmeans` (K-Means labels) is query-independent and
cached with the scene, keyed by `grouping_key`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from uhrbat.compression.segments import segment_ids_for_scale
from uhrbat.compression.selection import cluster_tokens, preserve_and_merge, select_segments, select_topk
from uhrbat.compression.types import Selection
from uhrbat.errors import MaskError
from uhrbat.selectors import register_selector
from uhrbat.selectors.base import ScaleTokens, SelectorBase

__all__ = ["KMeansSelector", "SegmentsSelector", "TopKSelector"]


@register_selector("kmeans")
class KMeansSelector(SelectorBase):
    grouping = True

    def grouping_key(self, options: Any, config: Any) -> tuple:
        """K of *every* scale (one seeded generator runs through the scales in order), iterations,
        seed, mode and the clustering feature weights."""
        return (
            "kmeans",
            tuple(options.clusters(b) for b in options.budgets),
            options.kmeans_iters,
            options.seed,
            options.kmeans_mode,
            config.kmeans_feat_scale,
            config.kmeans_coord_scale,
            config.tokens_per_side,
        )

    def group(
        self,
        tokens: ScaleTokens,
        budget: int,
        options: Any,
        config: Any,
        generator: torch.Generator,
        details: dict | None = None,
    ) -> Tensor:
        """K-Means labels `[N]` of one scale; `details[scale]` gets the whole `KMeansResult`."""
        result = cluster_tokens(
            tokens.embeds,
            budget,
            num_tiles=tokens.num_tiles,
            num_clusters=options.kmeans_clusters,
            max_iters=options.kmeans_iters,
            generator=generator,
            mode=options.kmeans_mode,
            feat_scale=config.kmeans_feat_scale,
            coord_scale=config.kmeans_coord_scale,
            tokens_per_side=tokens.geometry.tokens_per_side,
        )
        if details is not None:
            details[tokens.scale] = result
        return result.labels

    def select(
        self, tokens: ScaleTokens, relevance: Tensor, budget: int, options: Any, groups: Any = None, mask: Any = None
    ) -> Selection:
        if groups is None:
            raise ValueError(f"no K-Means labels for scale {tokens.scale}; group the scene first")
        return preserve_and_merge(tokens.embeds, relevance, groups, budget, exact=options.kmeans_mode == "exact")


@register_selector("segments")
class SegmentsSelector(SelectorBase):
    needs_masks = True

    def select(
        self, tokens: ScaleTokens, relevance: Tensor, budget: int, options: Any, groups: Any = None, mask: Any = None
    ) -> Selection:
        if mask is None:
            raise MaskError(f"selector 'segments' needs the segment mask of scale {tokens.scale}")
        g = tokens.geometry
        seg = segment_ids_for_scale(mask, tokens.scale, g.tile_size, g.patch_size).to(tokens.embeds.device)
        if not tokens.complete:
            seg = seg[tokens.positions().to(seg.device)]
        return select_segments(tokens.embeds, relevance, budget, seg)


@register_selector("topk")
class TopKSelector(SelectorBase):
    def select(
        self, tokens: ScaleTokens, relevance: Tensor, budget: int, options: Any, groups: Any = None, mask: Any = None
    ) -> Selection:
        return select_topk(tokens.embeds, relevance, budget)
