"""Pure-tensor token compression: relevance maths, K-Means, preserve-and-merge selection, segment masks."""

from uhrbat.compression.kmeans import (
    KMeansResult,
    clustering_features,
    kmeans,
    tile_coordinates,
)
from uhrbat.compression.segments import load_mask_file, segment_ids_for_scale
from uhrbat.compression.selection import (
    check_budget,
    cluster_tokens,
    max_selectable,
    preserve_and_merge,
    select_segments,
    select_topk,
)
from uhrbat.compression.types import Selection

__all__ = [
    "KMeansResult",
    "Selection",
    "check_budget",
    "clustering_features",
    "kmeans",
    "load_mask_file",
    "max_selectable",
    "preserve_and_merge",
    "segment_ids_for_scale",
    "cluster_tokens",
    "select_segments",
    "select_topk",
    "tile_coordinates",
]
