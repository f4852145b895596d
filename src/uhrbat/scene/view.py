"""`SceneView`: a scene as one question uses it.

The model scores a question, then asks the view for each scale's candidate tokens and groups
(`prepare`). The view decides which tiles the question needs (every tile with `encode="full"`,
`uhrbat.scene.gating` with `encode="gated"`), encodes the ones the scene lacks (never one twice),
and groups the candidates with the selector's query-independent step - from the scene's memo or
the store when that grouping was computed before. It records what it did: seconds spent
encoding and grouping, tiles encoded per scale, and whether the grouping was reused.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from uhrbat.scene.gating import plan_tiles
from uhrbat.scene.keys import digest
from uhrbat.scene.pixels import TilePixels
from uhrbat.scene.scene import Scene
from uhrbat.selectors import get_selector
from uhrbat.selectors.base import ScaleTokens

__all__ = ["SceneView", "ViewStats"]

Progress = Callable[[str, dict[str, Any]], None]


@dataclass
class ViewStats:
    """What a view did for one question."""

    encode: float = 0.0  # seconds encoding tiles the scene lacked
    group: float = 0.0  # seconds computing groupings (0 when reused)
    tiles_encoded: dict[int, int] = field(default_factory=dict)  # scale -> tiles encoded now
    groups: str = "none"  # "none" (no grouping step) | "off" | "miss" | "hit" | "disk"


class SceneView:
    """One question's access to a scene.

    Args:
        scene: the scene (its base scale complete).
        model: the `UhrBatForConditionalGeneration` (its `encode_scene` / `group_scene` run here).
        pixels: where tiles the scene lacks are cut from (None: the scene must already hold
            every tile a question needs).
        store, key: the scene store and the scene's key (None: nothing is kept across calls).
        progress: called as `progress(stage, info)` before encoding and grouping.
    """

    def __init__(
        self,
        scene: Scene,
        model: Any,
        pixels: TilePixels | Callable[[], TilePixels] | None = None,
        store: Any = None,
        key: str | None = None,
        progress: Progress | None = None,
    ) -> None:
        self._shared = {"scene": scene}  # one scene state for every view of one image in a call
        self.model = model
        self._pixels = pixels
        self.store = store if key is not None else None
        self.key = key
        self.progress = progress
        self.stats = ViewStats()

    @property
    def scene(self) -> Scene:
        return self._shared["scene"]

    @scene.setter
    def scene(self, value: Scene) -> None:
        self._shared["scene"] = value

    @property
    def score_base(self) -> Tensor:
        return self.scene.score_base

    def sibling(self, progress: Progress | None = None) -> SceneView:
        """Another question's view of the same scene state (what one grows, the other sees)."""
        other = SceneView(self.scene, self.model, self._pixels, self.store, self.key, progress)
        other._shared = self._shared
        return other

    # ------------------------------------------------------------------ the model's entry point
    def prepare(
        self, relevance: list[Tensor], opts: Any, trace: Any = None
    ) -> tuple[dict[int, ScaleTokens], dict[int, Tensor]]:
        """Candidate tokens and groups of every scale for one question.

        Args:
            relevance: per scale (config order) `[T_s, t, t]` relevance of this question.
            opts: `ResolvedSelection`.
            trace: optional `ImageTrace` (K-Means results of groupings computed here).
        """
        cfg = self.model.config
        selector = get_selector(opts.selector)
        budgets = dict(zip(cfg.scales, opts.budgets))
        if opts.encode == "gated":
            rel = dict(zip(cfg.scales, relevance))
            plan = plan_tiles(rel, budgets, cfg.base_scale, selector.name == "topk", opts.gate_margin)
        else:
            plan = dict.fromkeys(cfg.scales)
        self.grow(plan)
        groups = self.groups(opts, selector, plan, trace) if selector.grouping else {}
        tokens = {s: self.scene.tokens(s, plan[s]) for s in cfg.scales}
        if self.progress is not None:
            self.progress("select", {"selector": selector.name})
        return tokens, groups

    # ------------------------------------------------------------------ growth
    def grow(self, plan: dict[int, Tensor | None]) -> None:
        """Encode the planned tiles the scene lacks; the grown scene goes back to the store."""
        if not any(self.scene.missing(s, t).numel() for s, t in plan.items()):
            return
        lock = self.store.key_lock(digest("grow", self.key)) if self.store is not None else contextlib.nullcontext()
        with lock:
            if self.store is not None:  # another question may have grown it meanwhile
                latest = self._stored_scene()
                if latest is not None:
                    self.scene = latest
            missing = {s: self.scene.missing(s, t) for s, t in plan.items()}
            missing = {s: t for s, t in missing.items() if t.numel()}
            if not missing:
                return
            if self.progress is not None:
                self.progress("encode", {"tiles": {s: int(t.numel()) for s, t in missing.items()}})
            t0 = time.perf_counter()
            pixels = self._pixels() if callable(self._pixels) else self._pixels
            if pixels is None:
                raise RuntimeError("the scene lacks tiles this question needs and has no pixels to encode them")
            tiles = torch.cat([pixels.tiles(s, t) for s, t in missing.items()])
            new = self.model.encode_scene(tiles, layout=missing)
            self.scene = self.scene.merge(new.features)
            if self.store is not None:
                self.store.put(self.key, self.scene.tensors())
            self.stats.encode += time.perf_counter() - t0
            for s, t in missing.items():
                self.stats.tiles_encoded[s] = self.stats.tiles_encoded.get(s, 0) + int(t.numel())

    def _stored_scene(self) -> Scene | None:
        got = self.store.get(self.key, self.scene.score_base.device)
        if got is None:
            return None
        scene = Scene.from_tensors(got[0], self.scene.geometry, self.scene.dtype)
        if scene is not None:
            scene.groupings = self.scene.groupings
        return scene

    # ------------------------------------------------------------------ groupings
    def groups(self, opts: Any, selector: Any, plan: dict[int, Tensor | None], trace: Any = None) -> dict[int, Tensor]:
        """The selector's query-independent groups of the planned candidates: from the scene's
        memo, the store, or computed now (one generator through the scales in order)."""
        cfg = self.model.config
        subsets = {s: None if t is None else t.tolist() for s, t in plan.items()}
        gkey = selector.grouping_key(opts, cfg)
        memo_key = digest(gkey, subsets)
        labels = self.scene.grouping(memo_key)
        if labels is not None:
            self.stats.groups = "hit"
            return labels
        skey = digest("groups", self.key, gkey, subsets if any(v is not None for v in subsets.values()) else None)
        lock = self.store.key_lock(skey) if self.store is not None else contextlib.nullcontext()
        with lock:
            if self.store is not None:
                got = self.store.get(skey, self.scene.score_base.device)
                if got is not None and self._valid(got[0], plan):
                    labels, self.stats.groups = {int(k): v for k, v in got[0].items()}, got[1]
            if labels is None:
                if self.progress is not None:
                    self.progress("group", {"selector": selector.name})
                t0 = time.perf_counter()
                labels = self.model.group_scene(self.scene, opts, trace, tiles=plan)
                self.stats.group += time.perf_counter() - t0
                self.stats.groups = "miss" if self.store is not None else "off"
                if self.store is not None:
                    self.store.put(skey, {str(s): v for s, v in labels.items()})
        self.scene.remember_grouping(memo_key, labels)
        return labels

    def _valid(self, item: dict[str, Tensor], plan: dict[int, Tensor | None]) -> bool:
        """A stored grouping fits the planned candidates (a foreign or stale item is recomputed)."""
        per_tile = self.scene.geometry.tokens.tokens_per_tile
        want = {
            s: (self.scene.geometry.num_tiles(s) if t is None else int(t.numel())) * per_tile
            for s, t in plan.items()
            if t is None or t.numel()
        }
        return sorted(item) == sorted(str(s) for s in want) and all(
            item[str(s)].shape == (n,) and item[str(s)].dtype == torch.int64 for s, n in want.items()
        )
