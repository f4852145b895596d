"""The query-independent half of UHR-BAT: tiles -> CLIP -> projector -> scale residuals, and the
selector's grouping step (K-Means) over a scene."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor

from uhrbat.compression.precision import autocast_off
from uhrbat.modeling.layers import run_until
from uhrbat.modeling.trace import ImageTrace
from uhrbat.scene.pixels import PyramidTiles
from uhrbat.scene.scene import ScaleFeatures, Scene, SceneGeometry
from uhrbat.scene.view import SceneView
from uhrbat.selectors import get_selector

__all__ = ["VisionMixin"]


class VisionMixin:
    """Vision methods of `UhrBatForConditionalGeneration` (uses `vision_tower`, `projector`,
    `scale_residuals`, `config`)."""

    def encode_tiles(
        self, tiles: Tensor, chunk_size: int | None = None, keep_clip: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """CLIP (selected layer, CLS dropped) + projector, chunked.

        Args:
            tiles: `[T, 3, tile, tile]` normalised tiles.
        Returns:
            `[T, t*t, H]` projected features (no residual) and, if `keep_clip`, the
            `[T, t*t, C]` CLIP features.
        """
        vm = self.vision_tower
        layers = vm.encoder.layers
        idx = self.config.vision_feature_layer % (len(layers) + 1)
        chunk = chunk_size or self.config.encode_chunk_size
        dtype = self.projector.fc1.weight.dtype
        outs, clips = [], []
        for i in range(0, tiles.shape[0], chunk):
            x = tiles[i : i + chunk].to(
                device=vm.embeddings.patch_embedding.weight.device, dtype=vm.embeddings.patch_embedding.weight.dtype
            )
            if idx == len(layers):
                h = vm(pixel_values=x).last_hidden_state
            else:
                # Stop before layer `idx`: its input is hidden_states[idx]; later layers never run.
                h, _ = run_until(vm, layers[idx], pixel_values=x)
            h = h[:, 1:]
            if keep_clip:
                clips.append(h)
            outs.append(self.projector(h.to(dtype)))
        return torch.cat(outs), (torch.cat(clips) if keep_clip else None)

    @torch.no_grad()
    @autocast_off  # selection ignores autocast (bf16 training): same tokens as inference
    def encode_scene(
        self,
        tiles: Tensor,
        keep_clip: bool = False,
        keep_features: bool = False,
        layout: dict[int, Tensor] | None = None,
    ) -> Scene:
        """Tiles -> CLIP -> projector -> residuals: a `Scene` (its `score_base` is None when the
        base scale is not among the tiles).

        Args:
            tiles: `[T, 3, tile, tile]` normalised tiles, scales ascending.
            keep_clip: also keep the CLIP features (training re-projects kept rows from them).
            keep_features: also keep projector output + residual once per scale (tracing).
            layout: scale -> `[n_s]` tile indices of the rows of `tiles`, in order; None = every
                tile of every scale (the whole pyramid).
        """
        cfg = self.config
        geometry = SceneGeometry.of(cfg)
        if layout is None:
            layout = {s: geometry.all_tiles(s) for s in cfg.scales}
        feats, clip = self.encode_tiles(tiles, keep_clip=keep_clip)
        rows, off = {}, 0
        for s, idx in layout.items():
            rows[s] = slice(off, off + int(idx.numel()))
            off += int(idx.numel())
        res = {s: self.scale_residuals(s).to(feats.dtype) for s in layout}
        base = cfg.base_scale
        score_base = (feats[rows[base]] + res[base]).reshape(-1, feats.shape[-1]) if base in layout else None
        traced = {s: feats[rows[s]] + res[s] for s in layout} if keep_features else None
        if cfg.enable_scale_pos_residual:
            # The released weights were trained with the residual added twice (§2.5). In place:
            # the same rounding as `(f + r) + r`, without a second copy of the pyramid.
            for s in layout:
                feats[rows[s]].add_(res[s]).add_(res[s])
        features = {s: ScaleFeatures(idx.to(torch.int64), feats[rows[s]]) for s, idx in layout.items()}
        clips = {s: clip[rows[s]] for s in layout} if clip is not None else None
        return Scene(geometry, features, score_base, clip=clips, traced=traced)

    def scene_view(self, tiles: Tensor, opts: Any, keep_clip: bool = False, keep_features: bool = False) -> SceneView:
        """A `SceneView` of one image's tiles `[T, 3, tile, tile]` (no store): the whole pyramid
        encoded now, or with `encode="gated"` the base scale now and finer tiles on demand."""
        cfg = self.config
        geometry = SceneGeometry.of(cfg)
        pixels = PyramidTiles(tiles, geometry)
        if opts.encode == "gated" and not keep_clip and not keep_features:
            base = geometry.all_tiles(cfg.base_scale)
            scene = self.encode_scene(pixels.tiles(cfg.base_scale, base), layout={cfg.base_scale: base})
        else:
            scene = self.encode_scene(tiles, keep_clip=keep_clip, keep_features=keep_features)
        return SceneView(scene, self, pixels)

    @torch.no_grad()
    @autocast_off  # selection ignores autocast (bf16 training): same tokens as inference
    def group_scene(
        self,
        scene: Scene,
        opts: Any,
        trace: ImageTrace | None = None,
        tiles: dict[int, Tensor | None] | None = None,
    ) -> dict[int, Tensor]:
        """The selector's query-independent groups `[N_s]` per scale (empty without a grouping step).

        One seeded generator runs through the scales in order, so the groups of a scale depend on
        the options of every scale before it (a cache key must hold them all).

        Args:
            scene: the encoded scene; opts: `ResolvedSelection`.
            tiles: scale -> the candidate tiles (None: every tile); a scale with no candidate
                tile gets no groups.
        """
        selector = get_selector(opts.selector)
        if not selector.grouping:
            return {}
        cfg = self.config
        generator = torch.Generator(device="cpu").manual_seed(opts.seed)
        details = trace.kmeans if trace is not None else None
        labels: dict[int, Tensor] = {}
        for s, budget in zip(cfg.scales, opts.budgets):
            subset = None if tiles is None else tiles.get(s)
            if subset is not None and subset.numel() == 0:
                continue
            t0 = time.perf_counter()
            labels[s] = selector.group(scene.tokens(s, subset), budget, opts, cfg, generator, details)
            if trace is not None:
                trace.timings["group"] = trace.timings.get("group", 0.0) + time.perf_counter() - t0
        return labels
