"""The query-dependent half of UHR-BAT: score the question, choose tokens per scale with the
selector, pass them through the token MLP, and splice them into the prompt (method §3-§4)."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from uhrbat.compression import relevance
from uhrbat.compression.types import Selection
from uhrbat.errors import BudgetError, ConfigError, PromptError
from uhrbat.modeling.scoring_pass import ScoringPrefix
from uhrbat.modeling.trace import ImageTrace
from uhrbat.modeling.training import needs_gradient, rows_with_grad
from uhrbat.options import SelectionOptions
from uhrbat.scene.view import SceneView
from uhrbat.selectors import get_selector
from uhrbat.selectors.base import require_mask

__all__ = ["VisualTokensMixin"]

ScoringPrefixProvider = Callable[[int, Tensor, Callable[[], ScoringPrefix]], ScoringPrefix]


class VisualTokensMixin:
    """Selection and splicing methods of `UhrBatForConditionalGeneration`."""

    def compress_image(
        self,
        tiles: Tensor | None,
        prefix_embeds: Tensor,
        suffix_embeds: Tensor,
        opts: Any,
        masks: dict | None = None,
        trace: ImageTrace | None = None,
        scene: SceneView | None = None,
        scoring_prefix: Callable[[Callable[[], ScoringPrefix]], ScoringPrefix] | None = None,
    ) -> Tensor:
        """One image -> `[n_visual, H]` post-MLP tokens for the LLM.

        Args:
            tiles: `[T, 3, tile, tile]` tiles of the image (unused when `scene` is given).
            prefix_embeds / suffix_embeds: `[P, H]` / `[S, H]` the prompt around the image (the
                suffix ends with the relevance query token).
            opts: `ResolvedSelection`.
            scene: a prepared `SceneView` (the pipeline's, with its cache); the result is bitwise
                the same as encoding `tiles` here.
            scoring_prefix: if given, switches to the two-step scoring pass (`score_prefix` +
                `score_relevance_from_prefix`): it is called with a function that computes this
                image's `ScoringPrefix` and returns that state (e.g. from a cache).
        """
        cfg = self.config
        t0 = time.perf_counter()
        # Training: selection runs without gradient, then only the rows that reach the LLM are
        # re-projected with gradient from the (frozen) CLIP features.
        need_grad = needs_gradient(self)
        want_features = trace is not None and trace.want_clip
        if scene is None:
            if tiles is None:
                raise ValueError("compress_image needs tiles or a prepared scene")
            scene = self.scene_view(tiles, opts, keep_clip=need_grad or want_features, keep_features=want_features)
        elif need_grad and scene.scene.clip is None:
            raise ValueError("training needs the CLIP features: pass tiles, not a prepared scene")
        encoded_before = scene.stats.encode
        t1 = time.perf_counter()
        if scoring_prefix is None:
            rel_base = self.score_relevance(prefix_embeds, scene.score_base, suffix_embeds)
        else:
            state = scoring_prefix(lambda: self.score_prefix(prefix_embeds, scene.score_base))
            rel_base = self.score_relevance_from_prefix(state, suffix_embeds)
        rels = relevance.upsample_relevance(
            rel_base.float(), cfg.grid(cfg.base_scale), [cfg.grid(s) for s in cfg.scales], cfg.tokens_per_side
        )
        t2 = time.perf_counter()
        tokens, groups = scene.prepare(rels, opts, trace)
        selector = get_selector(opts.selector)
        chosen: list[Tensor] = []
        for s, rel, budget in zip(cfg.scales, rels, opts.budgets):
            tok = tokens[s]
            mask = require_mask(masks, s, selector.name) if selector.needs_masks else None
            with torch.no_grad():
                r = rel.reshape(-1) if tok.complete else rel[tok.tiles.to(rel.device)].reshape(-1)
                if tok.embeds.shape[0]:
                    sel = selector.select(tok, r.to(tok.embeds.device), budget, opts, groups.get(s), mask)
                    sel.positions = tok.to_scale(sel.positions)
                else:  # gated, nothing of this scale needed (budget 0)
                    sel = Selection.empty(tok.embeds)
            if need_grad:
                clip = scene.scene.clip[s]
                sel.embeds = rows_with_grad(self, clip.reshape(-1, clip.shape[-1]), s, sel)
            chosen.append(sel.embeds)
            if trace is not None:
                trace.selections[s] = sel
                trace.relevance[s] = rel
                if scene.scene.traced is not None:
                    trace.features[s] = scene.scene.traced[s]
        pre = torch.cat(chosen)
        post = self.token_mlp(pre)
        t3 = time.perf_counter()
        if trace is not None:
            grown = scene.stats.encode - encoded_before  # tiles encoded for this question
            trace.relevance_base = rel_base
            trace.pre_mlp, trace.post_mlp = pre.detach(), post.detach()
            trace.timings.update(encode=t1 - t0 + grown, score=t2 - t1, select=t3 - t2 - grown)
            if scene.scene.clip is not None:
                trace.clip_features.update(scene.scene.clip)
        return post

    def prepare_inputs_embeds(
        self,
        input_ids: torch.LongTensor,
        attention_mask: Tensor | None,
        pixel_values: Tensor | None,
        masks: Sequence[dict | None] | None = None,
        traces: list[ImageTrace] | None = None,
        query_index: Tensor | None = None,
        scenes: Sequence[SceneView] | None = None,
        scoring_prefix: ScoringPrefixProvider | None = None,
        options: SelectionOptions | None = None,
        **selection: Any,
    ) -> tuple[Tensor, Tensor]:
        """Replace each prompt's `<image>` placeholder run with its selected visual tokens.

        Args:
            input_ids: `[B, L]` with one contiguous run of `image_token_id` per row.
            attention_mask: `[B, L]` (left or right padding).
            pixel_values: `[B, T, 3, tile, tile]` tiles of each row's image.
            query_index: optional `[B]` position of each row's relevance query token (the last
                prompt token); text after it (e.g. the answer in training) is not seen by the
                scoring pass. Default: the last position.
            scenes: optional per-row `SceneView`s used instead of `pixel_values` (which may then
                be None).
            scoring_prefix: optional; switches to the two-step scoring pass. Called as
                `scoring_prefix(row, prefix_ids, compute)` with the row's ids before the image
                (padding dropped) and a function computing its `ScoringPrefix`; returns that
                state (computed or cached: the pipeline keys it by scene and `prefix_ids`).
            options: the selection options (`SelectionOptions`, resolved here once), or the
                same as keywords (`budgets=`, `selector=`, ...).
        Returns:
            `inputs_embeds` `[B, L, H]` and the attention mask `[B, L]`; if a scale yields
            fewer tokens than its budget (fewer candidates), the unused placeholders are
            masked out so the sequence equals the reference's shorter one.
        """
        cfg = self.config
        if options is not None and selection:
            both = ", ".join(selection)
            raise ConfigError(f"give the selection options as options= or as keywords, not both ({both})")
        opts = (options if options is not None else SelectionOptions.of(**selection)).resolve(cfg)
        image_id = self.image_token_id
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.clone()
        inputs_embeds = self.get_input_embeddings()(input_ids.masked_fill(input_ids == image_id, 0))
        expected = sum(min(k, cfg.num_tokens(s)) for k, s in zip(opts.budgets, cfg.scales))
        if scenes is None and pixel_values is None:
            raise PromptError("got <image> placeholders but neither pixel_values nor prepared scenes")
        if pixel_values is not None and pixel_values.dim() == 4:
            pixel_values = pixel_values.unsqueeze(0)
        n_images = len(scenes) if scenes is not None else pixel_values.shape[0]
        if n_images != input_ids.shape[0]:
            raise PromptError(f"got {n_images} images for {input_ids.shape[0]} prompts")
        rows = []
        for b in range(input_ids.shape[0]):
            start, stop = _placeholder_run(input_ids[b], image_id, b, expected, opts.budgets)
            valid = attention_mask[b].bool()
            pre_idx = torch.arange(start, device=input_ids.device)[valid[:start]]
            end = input_ids.shape[1] if query_index is None else int(query_index[b]) + 1
            if end <= stop:
                raise PromptError(f"prompt {b}: the relevance query token (index {end - 1}) must come after the image")
            suf_idx = torch.arange(stop, end, device=input_ids.device)[valid[stop:end]]
            visual = self.compress_image(
                None if pixel_values is None else pixel_values[b],
                inputs_embeds[b, pre_idx],
                inputs_embeds[b, suf_idx],
                opts,
                masks=None if masks is None else masks[b],
                trace=traces[b] if traces is not None else None,
                scene=None if scenes is None else scenes[b],
                scoring_prefix=None
                if scoring_prefix is None
                else functools.partial(scoring_prefix, b, input_ids[b, pre_idx]),
            )
            n = visual.shape[0]
            rows.append(
                torch.cat(
                    [
                        inputs_embeds[b, :start],
                        visual.to(inputs_embeds.dtype),
                        inputs_embeds.new_zeros(expected - n, inputs_embeds.shape[-1]),
                        inputs_embeds[b, stop:],
                    ]
                )
            )
            if n < expected:
                attention_mask[b, start + n : stop] = 0
        return torch.stack(rows), attention_mask


def _placeholder_run(ids: Tensor, image_id: int, row: int, expected: int, budgets: Sequence[int]) -> tuple[int, int]:
    """`(start, stop)` of the one run of `expected` image placeholders in `ids`, or a one-line error."""
    where = (ids == image_id).nonzero().flatten()
    if where.numel() == 0:
        raise PromptError(f"prompt {row} has no <image> placeholder tokens")
    start, stop = int(where[0]), int(where[-1]) + 1
    if stop - start != where.numel():
        raise PromptError(f"prompt {row} has several <image> markers; exactly one image per prompt is supported")
    if where.numel() != expected:
        raise BudgetError(
            f"prompt {row} has {where.numel()} image placeholders but budgets {list(budgets)} give {expected} "
            "visual tokens; build the inputs with the same budgets (pass budgets to the processor)"
        )
    return start, stop
