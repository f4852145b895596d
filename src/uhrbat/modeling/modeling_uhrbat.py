"""UHR-BAT model: CLIP tower + projector + scale residuals + token MLP + Qwen2 LM.

Pipeline for one image (method §11):

    tiles --CLIP (penultimate, chunked)--> projector --> F[s]            [T_s, 576, H]
    scoring:   prompt with F[base] + R[base] spliced --LLM up to the last layer's input-->
               last prompt token's Q . K over image tokens, head mean --> relevance (base)
               --bilinear--> relevance at every scale                    [T_s, 24, 24]
    selection: E[s] = F[s] (+ R[s] + R[s] when enable_scale_pos_residual), grouped
               (K-Means / segments / singletons), greedy preserve-and-merge per budget
    token MLP on the selected rows, spliced at the `<image>` placeholders, LLM generates.

Each tile is encoded exactly once; scoring and selection inputs derive from the same tensor.
"""

from __future__ import annotations

import functools
import operator
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import CLIPVisionModel, GenerationMixin, PreTrainedModel, Qwen2ForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

from uhrbat.compression import scoring
from uhrbat.compression.precision import autocast_off
from uhrbat.compression.segments import segment_ids_for_scale
from uhrbat.compression.selection import cluster_tokens, preserve_and_merge, select_segments, select_topk
from uhrbat.compression.types import Selection
from uhrbat.configuration import UhrBatConfig, is_reference_checkpoint
from uhrbat.errors import BudgetError, CheckpointError, ConfigError, MaskError, PromptError
from uhrbat.modeling.compat import from_reference_call


# ----------------------------------------------------------------------------- helpers
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


@dataclass
class ImageTrace:
    """Intermediates of one image (kept for `uhrbat trace`, `--json` and overlays)."""

    relevance_base: torch.Tensor | None = None  # [N_base]
    relevance: dict[int, torch.Tensor] = field(default_factory=dict)  # scale -> [T, 24, 24]
    selections: dict[int, Selection] = field(default_factory=dict)
    kmeans: dict[int, Any] = field(default_factory=dict)
    pre_mlp: torch.Tensor | None = None
    post_mlp: torch.Tensor | None = None
    features: dict[int, torch.Tensor] = field(default_factory=dict)  # scale -> [T, 576, H] (+1 residual), optional
    clip_features: dict[int, torch.Tensor] = field(default_factory=dict)
    score_inputs_embeds: torch.Tensor | None = None
    timings: dict[str, float] = field(default_factory=dict)
    want_clip: bool = False  # also keep CLIP and projected features of every scale (tracing)


@dataclass
class SceneFeatures:
    """Query-independent tensors of one image: what `encode_scene` computes and the scene cache keeps.

    Attributes:
        embeds: `[T, 576, H]` selection embeddings of every tile (scales ascending): projector
            output, plus the scale residual twice when `config.enable_scale_pos_residual`.
        score_base: `[N_base, H]` base-scale tokens + the residual once (the scoring pass's image).
        features: scale -> `[T_s, 576, H]` projector output + residual once (tracing only).
        clip: `[T, 576, C]` CLIP features (training / tracing only).
    """

    embeds: torch.Tensor
    score_base: torch.Tensor
    features: dict[int, torch.Tensor] | None = None
    clip: torch.Tensor | None = None


@dataclass
class ScoringPrefix:
    """Query-independent state of the scoring pass: the text before the image and the image.

    Used only when the scoring prefix is reused (`UhrBatPipeline(reuse_scoring_prefix=True)`);
    see `score_prefix` for why that is not bitwise the one-pass scoring.

    Attributes:
        keys, values: per layer `0 .. L-2`, `[1, H_kv, n, d]` attention keys (rotated) and values.
        last_keys: `[1, H_kv, n, d]` the last layer's rotated keys of the same `n` rows.
        image_start: index of the first image row (= number of text rows before the image).
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    last_keys: torch.Tensor
    image_start: int

    @property
    def length(self) -> int:
        return int(self.last_keys.shape[2])

    def tensors(self) -> dict[str, torch.Tensor]:
        """Flat tensor dict (scene cache item); `image_start` travels as a 0-d int64 tensor."""
        out = {f"k.{i}": k for i, k in enumerate(self.keys)} | {f"v.{i}": v for i, v in enumerate(self.values)}
        out["last_k"] = self.last_keys
        out["image_start"] = torch.tensor(self.image_start, dtype=torch.int64, device=self.last_keys.device)
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], num_layers: int) -> ScoringPrefix | None:
        """Inverse of `tensors`, or None when the item does not hold `num_layers - 1` layers of
        one consistent shape (a foreign or stale item is recomputed, never used)."""
        try:
            keys = [tensors[f"k.{i}"] for i in range(num_layers - 1)]
            values = [tensors[f"v.{i}"] for i in range(num_layers - 1)]
            last, start = tensors["last_k"], int(tensors["image_start"])
        except (KeyError, TypeError, ValueError, RuntimeError):
            return None
        if len(tensors) != 2 * num_layers or last.dim() != 4 or not 0 <= start < last.shape[2]:
            return None
        if any(t.dim() != 4 or t.shape[:3] != last.shape[:3] or t.dtype != last.dtype for t in keys + values):
            return None
        return cls(keys=keys, values=values, last_keys=last, image_start=start)


@dataclass
class SelectionOptions:
    """Per-call overrides of the config's selection settings."""

    budgets: list[int]
    selector: str
    kmeans_clusters: int | None
    kmeans_iters: int
    kmeans_mode: str
    seed: int

    @classmethod
    def resolve(cls, config: UhrBatConfig, **kw: Any) -> SelectionOptions:
        from uhrbat.processing.processing_uhrbat import parse_budgets

        def given(name: str, default: Any) -> Any:
            # Only None means "not given": 0 is a value (and an error for kmeans_iters), never the default.
            value = kw.get(name)
            return default if value is None else value

        opts = cls(
            budgets=parse_budgets(given("budgets", config.budgets), len(config.scales)),
            selector=given("selector", config.selector),
            kmeans_clusters=config.kmeans_clusters
            if kw.get("kmeans_clusters", "unset") == "unset"
            else kw["kmeans_clusters"],
            kmeans_iters=given("kmeans_iters", config.kmeans_iters),
            kmeans_mode=given("kmeans_mode", config.kmeans_mode),
            seed=given("seed", config.seed),
        )
        if opts.selector not in ("kmeans", "segments", "topk"):
            raise ConfigError(f"selector must be kmeans, segments or topk, got {opts.selector!r}")
        if opts.kmeans_mode not in ("fast", "exact"):
            raise ConfigError(f"kmeans_mode must be fast or exact, got {opts.kmeans_mode!r}")
        for name in ("kmeans_iters", "kmeans_clusters", "seed"):
            value = getattr(opts, name)
            if value is None:
                continue
            try:
                if isinstance(value, bool):
                    raise TypeError
                setattr(opts, name, operator.index(value))
            except TypeError:
                raise ConfigError(f"{name} must be an integer, got {value!r}") from None
        if opts.kmeans_iters < 1:
            raise ConfigError(f"kmeans_iters must be >= 1 (Lloyd iterations), got {opts.kmeans_iters}")
        if opts.kmeans_clusters is not None and opts.kmeans_clusters < 0:
            raise ConfigError(f"kmeans_clusters must be >= 0 (0 = the scale's budget), got {opts.kmeans_clusters}")
        return opts


# ----------------------------------------------------------------------------- model
class UhrBatPreTrainedModel(PreTrainedModel):
    config: UhrBatConfig
    config_class = UhrBatConfig
    base_model_prefix = ""
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["Qwen2DecoderLayer", "CLIPEncoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, ScaleResidual):
            # The reference initialises residuals as randn / sqrt(hidden).
            for p in module.grids.values():
                nn.init.normal_(p, std=p.shape[-1] ** -0.5)
        else:
            super()._init_weights(module)


class UhrBatForConditionalGeneration(UhrBatPreTrainedModel, GenerationMixin):
    """UHR-BAT with a language-modelling head.

    Use with [`UhrBatProcessor`]:

    ```python
    inputs = processor(images=image, text=processor.build_prompt("How many ships?"))
    answer_ids = model.generate(**inputs, max_new_tokens=32)  # answer tokens only
    processor.batch_decode(answer_ids)
    ```
    """

    _tied_weights_keys: dict[str, str] = {}

    def __init__(self, config: UhrBatConfig) -> None:
        super().__init__(config)
        self.vision_tower = CLIPVisionModel(config.vision_config)
        self.projector = MLP2x(config.vision_config.hidden_size, config.text_config.hidden_size)
        self.scale_residuals = ScaleResidual(config)
        self.token_mlp = MLP2x(config.text_config.hidden_size, config.text_config.hidden_size)
        self.language_model = Qwen2ForCausalLM(config.text_config)
        self.post_init()

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any
    ) -> UhrBatForConditionalGeneration:
        """Load this package's format strictly: missing weights raise `CheckpointError`.

        Reference-format checkpoints (`LlavaQwenForCausalLM`, e.g. the released `RL-MIND/UHR-BAT`)
        go through the one loading entry, `uhrbat.modeling.loading.load`, which also builds the
        processor; this method names it instead of guessing."""
        path = str(pretrained_model_name_or_path)
        if is_reference_checkpoint(path):
            raise CheckpointError(
                f"{path} is a reference-format (LlavaQwenForCausalLM) checkpoint; load it with "
                f"uhrbat.modeling.loading.load({path!r}) or convert it once with `uhrbat convert {path} DST`"
            )
        kwargs["output_loading_info"] = True
        try:
            model, info = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except OSError as e:  # no weights file, unreadable shard, ...
            raise CheckpointError(f"{path}: {str(e).splitlines()[0]}") from e
        missing = sorted(info.get("missing_keys") or [])
        if missing:
            raise CheckpointError(
                f"{path}: {len(missing)} weights missing from the checkpoint, e.g. {', '.join(missing[:4])}"
            )
        return model

    # ------------------------------------------------------------------ plumbing
    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    @property
    def lm_layers(self) -> nn.ModuleList:
        return self.language_model.model.layers

    def _tile_slices(self) -> dict[int, slice]:
        out, off = {}, 0
        for s in self.config.scales:
            n = self.config.num_tiles(s)
            out[s] = slice(off, off + n)
            off += n
        return out

    # ------------------------------------------------------------------ vision
    def encode_tiles(
        self, tiles: torch.Tensor, chunk_size: int | None = None, keep_clip: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """CLIP (selected layer, CLS dropped) + projector, chunked.

        Args:
            tiles: `[T, 3, 336, 336]` normalised tiles.
        Returns:
            `[T, 576, H]` projected features (no residual) and, if `keep_clip`, the
            `[T, 576, C]` CLIP features.
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

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    @autocast_off  # selection ignores autocast (bf16 training): same tokens as inference
    def score_relevance(
        self, prefix_embeds: torch.Tensor, image_embeds: torch.Tensor, suffix_embeds: torch.Tensor
    ) -> torch.Tensor:
        """Relevance of each base-scale token for one prompt.

        Args:
            prefix_embeds: `[P, H]` embedded text before the image.
            image_embeds: `[N, H]` base-scale tokens (projector output + 1x residual).
            suffix_embeds: `[S, H]` embedded text after the image (ends with the query token).
        Returns:
            `[N]` float32 relevance.
        """
        seq = torch.cat([prefix_embeds, image_embeds, suffix_embeds]).unsqueeze(0)
        L = seq.shape[1]
        positions = torch.arange(L, device=seq.device).unsqueeze(0)
        last = self.lm_layers[-1]
        hidden, kw = run_until(
            self.language_model.model, last, inputs_embeds=seq, position_ids=positions, use_cache=False
        )
        cos, sin = kw["position_embeddings"]
        attn = last.self_attn
        d = attn.head_dim
        h = last.input_layernorm(hidden)  # [1, L, H]
        k = attn.k_proj(h).view(1, L, -1, d).transpose(1, 2)  # [1, Hkv, L, d]
        # Project every row, then keep the last: the same GEMM as the reference, so the query
        # rounds identically (a 1-row projection differs in the last bits).
        q = attn.q_proj(h)[:, -1:].view(1, 1, -1, d).transpose(1, 2)  # [1, H, 1, d]
        q, _ = apply_rotary_pos_emb(q, q, cos[:, -1:], sin[:, -1:])
        k, _ = apply_rotary_pos_emb(k, k, cos, sin)
        probs = scoring.last_query_attention(q[0, :, 0], k[0], d)
        pos = torch.arange(prefix_embeds.shape[0], prefix_embeds.shape[0] + image_embeds.shape[0], device=seq.device)
        return scoring.image_relevance(probs, pos)

    def _last_layer_kq(
        self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, want_q: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rotated last-layer keys `[1, H_kv, n, d]` of `hidden` `[1, n, H]` and, if `want_q`, the
        rotated query `[1, H, 1, d]` of its last row (every row projected, as in `score_relevance`)."""
        last = self.lm_layers[-1]
        attn = last.self_attn
        d, n = attn.head_dim, hidden.shape[1]
        h = last.input_layernorm(hidden)
        k = attn.k_proj(h).view(1, n, -1, d).transpose(1, 2)
        k, _ = apply_rotary_pos_emb(k, k, cos, sin)
        if not want_q:
            return k, None
        q = attn.q_proj(h)[:, -1:].view(1, 1, -1, d).transpose(1, 2)
        q, _ = apply_rotary_pos_emb(q, q, cos[:, -1:], sin[:, -1:])
        return k, q

    @torch.no_grad()
    @autocast_off
    def score_prefix(self, prefix_embeds: torch.Tensor, image_embeds: torch.Tensor) -> ScoringPrefix:
        """The query-independent half of a two-step scoring pass: text before the image + image.

        Not bitwise the one-pass `score_relevance`: there, the rows before the question are
        computed in attention products whose key axis spans the whole prompt, and that length
        (question included) changes their last bits (on the parity fixtures: relevance within
        ~1e-9 absolute, 5e-7 relative; same selections and answers). Pair it only with
        `score_relevance_from_prefix`, never mix it with the one-pass numbers.

        Args:
            prefix_embeds: `[P, H]` embedded text before the image; image_embeds: `[N, H]`.
        """
        from transformers import DynamicCache

        seq = torch.cat([prefix_embeds, image_embeds]).unsqueeze(0)
        n = seq.shape[1]
        cache = DynamicCache(config=self.language_model.config)
        positions = torch.arange(n, device=seq.device).unsqueeze(0)
        hidden, kw = run_until(
            self.language_model.model,
            self.lm_layers[-1],
            inputs_embeds=seq,
            position_ids=positions,
            use_cache=True,
            cache=cache,
        )
        last_k, _ = self._last_layer_kq(hidden, *kw["position_embeddings"], want_q=False)
        layers = cache.layers[: len(self.lm_layers) - 1]
        return ScoringPrefix(
            keys=[lay.keys for lay in layers],
            values=[lay.values for lay in layers],
            last_keys=last_k,
            image_start=prefix_embeds.shape[0],
        )

    @torch.no_grad()
    @autocast_off
    def score_relevance_from_prefix(self, prefix: ScoringPrefix, suffix_embeds: torch.Tensor) -> torch.Tensor:
        """`[N]` float32 relevance of the prefix's image rows for the question `suffix_embeds`
        `[S, H]` (ends with the query token): only the suffix's rows run through the LLM."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.language_model.config)
        for i, (k, v) in enumerate(zip(prefix.keys, prefix.values)):
            cache.update(k, v, i)  # concatenation with the suffix makes new tensors: `prefix` is not changed
        seq = suffix_embeds.unsqueeze(0)
        n0 = prefix.length
        positions = torch.arange(n0, n0 + seq.shape[1], device=seq.device).unsqueeze(0)
        hidden, kw = run_until(
            self.language_model.model,
            self.lm_layers[-1],
            inputs_embeds=seq,
            position_ids=positions,
            use_cache=True,
            cache=cache,
        )
        k, q = self._last_layer_kq(hidden, *kw["position_embeddings"], want_q=True)
        d = self.lm_layers[-1].self_attn.head_dim
        probs = scoring.last_query_attention(q[0, :, 0], torch.cat([prefix.last_keys, k], dim=2)[0], d)
        pos = torch.arange(prefix.image_start, n0, device=seq.device)
        return scoring.image_relevance(probs, pos)

    # ------------------------------------------------------------------ selection
    @torch.no_grad()
    @autocast_off  # selection ignores autocast (bf16 training): same tokens as inference
    def encode_scene(self, tiles: torch.Tensor, keep_clip: bool = False, keep_features: bool = False) -> SceneFeatures:
        """The query-independent half of `compress_image`: tiles -> CLIP -> projector -> residuals.

        Args:
            tiles: `[T, 3, 336, 336]` normalised tiles of one image (all scales).
            keep_clip: also keep the CLIP features (training re-projects kept rows from them).
            keep_features: also keep projector output + residual once per scale (tracing).
        """
        cfg = self.config
        feats, clip = self.encode_tiles(tiles, keep_clip=keep_clip)
        sl = self._tile_slices()
        res = {s: self.scale_residuals(s).to(feats.dtype) for s in cfg.scales}
        score_base = (feats[sl[cfg.base_scale]] + res[cfg.base_scale]).reshape(-1, feats.shape[-1])
        features = {s: feats[sl[s]] + res[s] for s in cfg.scales} if keep_features else None
        if cfg.enable_scale_pos_residual:
            # The released weights were trained with the residual added twice (§2.5). In place:
            # the same rounding as `(f + r) + r`, without a second copy of the pyramid.
            for s in cfg.scales:
                feats[sl[s]].add_(res[s]).add_(res[s])
        return SceneFeatures(embeds=feats, score_base=score_base, features=features, clip=clip)

    @torch.no_grad()
    @autocast_off  # selection ignores autocast (bf16 training): same tokens as inference
    def group_scene(
        self, scene: SceneFeatures, opts: SelectionOptions, trace: ImageTrace | None = None
    ) -> dict[int, torch.Tensor]:
        """K-Means labels `[N_s]` per scale (empty unless the selector is kmeans).

        Query-independent. One seeded generator runs through the scales in order, so the labels
        of a scale depend on the options of every scale before it (a cache key must hold them all).
        """
        if opts.selector != "kmeans":
            return {}
        cfg = self.config
        sl = self._tile_slices()
        generator = torch.Generator(device="cpu").manual_seed(opts.seed)
        labels: dict[int, torch.Tensor] = {}
        for s, budget in zip(cfg.scales, opts.budgets):
            t0 = time.perf_counter()
            emb = scene.embeds[sl[s]].reshape(-1, scene.embeds.shape[-1])
            km = cluster_tokens(
                emb,
                budget,
                num_tiles=cfg.num_tiles(s),
                num_clusters=opts.kmeans_clusters,
                max_iters=opts.kmeans_iters,
                generator=generator,
                mode=opts.kmeans_mode,
                feat_scale=cfg.kmeans_feat_scale,
                coord_scale=cfg.kmeans_coord_scale,
                tokens_per_side=cfg.tokens_per_side,
            )
            labels[s] = km.labels
            if trace is not None:
                trace.kmeans[s] = km
                trace.timings["group"] = trace.timings.get("group", 0.0) + time.perf_counter() - t0
        return labels

    @staticmethod
    def require_mask(masks: dict | None, scale: int) -> Any:
        """The segment mask of `scale` for the `segments` selector, or `MaskError`.

        The reference silently fell back to top-k for a scale without a mask; a different
        selector is never substituted here without being asked for."""
        mask = None if masks is None else masks.get(scale, masks.get(str(scale)))
        if mask is None:
            raise MaskError(
                f"selector 'segments' needs a segment mask for every scale, but scale {scale} has none; "
                "pass the masks (`uhrbat masks` output, --masks FILE) or use selector 'topk'"
            )
        return mask

    def _select_scale(
        self,
        embeds: torch.Tensor,
        rel: torch.Tensor,
        budget: int,
        scale: int,
        opts: SelectionOptions,
        labels: torch.Tensor | None,
        masks: dict | None,
    ) -> Selection:
        if opts.selector == "topk":
            return select_topk(embeds, rel, budget)
        if opts.selector == "segments":
            mask = self.require_mask(masks, scale)
            seg = segment_ids_for_scale(mask, scale, self.config.tile_size, self.config.patch_size).to(embeds.device)
            return select_segments(embeds, rel, budget, seg)
        if labels is None:
            raise ValueError(f"no K-Means labels for scale {scale}; call group_scene first")
        return preserve_and_merge(embeds, rel, labels, budget, exact=opts.kmeans_mode == "exact")

    def compress_image(
        self,
        tiles: torch.Tensor | None,
        prefix_embeds: torch.Tensor,
        suffix_embeds: torch.Tensor,
        opts: SelectionOptions,
        masks: dict | None = None,
        trace: ImageTrace | None = None,
        scene: SceneFeatures | None = None,
        groups: dict[int, torch.Tensor] | None = None,
        scoring_prefix: Callable[[Callable[[], ScoringPrefix]], ScoringPrefix] | None = None,
    ) -> torch.Tensor:
        """All tiles of one image -> `[n_visual, H]` post-MLP tokens for the LLM.

        `scene` (from `encode_scene`) and `groups` (from `group_scene`, for these `opts`) skip
        the query-independent work; the result is bitwise the same as computing them here.
        `scoring_prefix`, if given, switches to the two-step scoring pass (`score_prefix` +
        `score_relevance_from_prefix`): it is called with a function that computes this image's
        `ScoringPrefix` and returns that state (e.g. from a cache)."""
        cfg = self.config
        t0 = time.perf_counter()
        # Training: selection runs without gradient, then only the rows that reach the LLM are
        # re-projected with gradient from the (frozen) CLIP features.
        need_grad = torch.is_grad_enabled() and any(
            p.requires_grad for m in (self.projector, self.scale_residuals) for p in m.parameters()
        )
        want_features = trace is not None and trace.want_clip
        if scene is None:
            if tiles is None:
                raise ValueError("compress_image needs tiles or a prepared scene")
            scene = self.encode_scene(tiles, keep_clip=need_grad or want_features, keep_features=want_features)
        elif need_grad and scene.clip is None:
            raise ValueError("training needs the CLIP features: pass tiles, not a prepared scene")
        t1 = time.perf_counter()
        sl = self._tile_slices()
        if scoring_prefix is None:
            rel_base = self.score_relevance(prefix_embeds, scene.score_base, suffix_embeds)
        else:
            state = scoring_prefix(lambda: self.score_prefix(prefix_embeds, scene.score_base))
            rel_base = self.score_relevance_from_prefix(state, suffix_embeds)
        rels = scoring.upsample_relevance(
            rel_base.float(), cfg.grid(cfg.base_scale), [cfg.grid(s) for s in cfg.scales], cfg.tokens_per_side
        )
        t2 = time.perf_counter()
        if groups is None:
            groups = self.group_scene(scene, opts, trace)
        chosen: list[torch.Tensor] = []
        for s, rel, budget in zip(cfg.scales, rels, opts.budgets):
            with torch.no_grad():
                emb = scene.embeds[sl[s]].reshape(-1, scene.embeds.shape[-1])
                sel = self._select_scale(emb, rel.reshape(-1).to(emb.device), budget, s, opts, groups.get(s), masks)
                del emb
            if need_grad:
                clip = scene.clip
                sel.embeds = self._rows_with_grad(clip[sl[s]].reshape(-1, clip.shape[-1]), s, sel)
            chosen.append(sel.embeds)
            if trace is not None:
                trace.selections[s] = sel
                trace.relevance[s] = rel
                if scene.features is not None:
                    trace.features[s] = scene.features[s]
        pre = torch.cat(chosen)
        post = self.token_mlp(pre)
        t3 = time.perf_counter()
        if trace is not None:
            trace.relevance_base = rel_base
            trace.pre_mlp, trace.post_mlp = pre.detach(), post.detach()
            trace.timings.update(encode=t1 - t0, score=t2 - t1, select=t3 - t2)
            if scene.clip is not None:
                for s in cfg.scales:
                    trace.clip_features[s] = scene.clip[sl[s]]
        return post

    def _rows_with_grad(self, clip_flat: torch.Tensor, scale: int, sel: Selection) -> torch.Tensor:
        """Recompute the selected rows of `scale` with gradient from CLIP features `[N, C]`.

        Only kept tokens and members of merged groups are projected, so activation memory
        follows the budget, not the 131k candidates.
        """
        n = len(sel)
        dev = clip_flat.device
        counts = (sel.offsets[1:] - sel.offsets[:-1]).to(dev)
        pos = sel.positions.to(dev)
        x = self.projector(clip_flat.index_select(0, pos).to(self.projector.fc1.weight.dtype))
        if self.config.enable_scale_pos_residual:
            r = self.scale_residuals(scale).to(x.dtype)[pos % self.config.tokens_per_tile]
            x = (x + r) + r
        row_of_member = torch.repeat_interleave(torch.arange(n, device=dev), counts)
        sums = torch.zeros(n, x.shape[-1], device=dev, dtype=torch.float32).index_add(0, row_of_member, x.float())
        return (sums / counts.unsqueeze(-1).float()).to(x.dtype)

    # ------------------------------------------------------------------ splicing
    def prepare_inputs_embeds(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None,
        pixel_values: torch.Tensor | None,
        masks: Sequence[dict | None] | None = None,
        traces: list[ImageTrace] | None = None,
        query_index: torch.Tensor | None = None,
        scenes: Sequence[SceneFeatures] | None = None,
        groups: Sequence[dict[int, torch.Tensor] | None] | None = None,
        scoring_prefix: Callable[[int, torch.Tensor, Callable[[], ScoringPrefix]], ScoringPrefix] | None = None,
        **selection: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Replace each prompt's `<image>` placeholder run with its selected visual tokens.

        Args:
            input_ids: `[B, L]` with one contiguous run of `image_token_id` per row.
            attention_mask: `[B, L]` (left or right padding).
            pixel_values: `[B, T, 3, 336, 336]` tiles of each row's image.
            query_index: optional `[B]` position of each row's relevance query token (the last
                prompt token); text after it (e.g. the answer in training) is not seen by the
                scoring pass. Default: the last position.
            scenes: optional per-row prepared scenes (`encode_scene`) used instead of
                `pixel_values` (which may then be None); `groups`: their K-Means labels
                (`group_scene` with the same selection options) or None to compute them.
            scoring_prefix: optional; switches to the two-step scoring pass. Called as
                `scoring_prefix(row, prefix_ids, compute)` with the row's ids before the image
                (padding dropped) and a function computing its `ScoringPrefix`; returns that
                state (computed or cached: the pipeline keys it by scene and `prefix_ids`).
        Returns:
            `inputs_embeds` `[B, L, H]` and the attention mask `[B, L]`; if a scale yields
            fewer tokens than its budget (fewer candidates), the unused placeholders are
            masked out so the sequence equals the reference's shorter one.
        """
        cfg = self.config
        opts = SelectionOptions.resolve(cfg, **selection)
        image_id = self.image_token_id
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.clone()
        embed = self.get_input_embeddings()
        safe_ids = input_ids.masked_fill(input_ids == image_id, 0)
        inputs_embeds = embed(safe_ids)
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
            where = (input_ids[b] == image_id).nonzero().flatten()
            if where.numel() == 0:
                raise PromptError(f"prompt {b} has no <image> placeholder tokens")
            start, stop = int(where[0]), int(where[-1]) + 1
            if stop - start != where.numel():
                raise PromptError(f"prompt {b} has several <image> markers; exactly one image per prompt is supported")
            if where.numel() != expected:
                raise BudgetError(
                    f"prompt {b} has {where.numel()} image placeholders but budgets {opts.budgets} give {expected} "
                    "visual tokens; build the inputs with the same budgets"
                )
            valid = attention_mask[b].bool()
            pre_idx = torch.arange(start, device=input_ids.device)[valid[:start]]
            end = input_ids.shape[1] if query_index is None else int(query_index[b]) + 1
            if end <= stop:
                raise PromptError(f"prompt {b}: the relevance query token (index {end - 1}) must come after the image")
            suf_idx = torch.arange(stop, end, device=input_ids.device)[valid[stop:end]]
            trace = traces[b] if traces is not None else None
            visual = self.compress_image(
                None if pixel_values is None else pixel_values[b],
                inputs_embeds[b, pre_idx],
                inputs_embeds[b, suf_idx],
                opts,
                masks=None if masks is None else masks[b],
                trace=trace,
                scene=None if scenes is None else scenes[b],
                groups=None if groups is None else groups[b],
                scoring_prefix=None
                if scoring_prefix is None
                else functools.partial(scoring_prefix, b, input_ids[b, pre_idx]),
            )
            n = visual.shape[0]
            row = torch.cat(
                [
                    inputs_embeds[b, :start],
                    visual.to(inputs_embeds.dtype),
                    inputs_embeds.new_zeros(expected - n, inputs_embeds.shape[-1]),
                    inputs_embeds[b, stop:],
                ]
            )
            if n < expected:
                attention_mask[b, start + n : stop] = 0
            rows.append(row)
        return torch.stack(rows), attention_mask

    @property
    def image_token_id(self) -> int:
        if self.config.image_token_id is None:
            raise ConfigError(
                "config.image_token_id is not set; load the model with its processor (UhrBatPipeline) or set it"
            )
        return int(self.config.image_token_id)

    # ------------------------------------------------------------------ forward / generate
    def _mask_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        n = self.config.vocab_in_use
        if n is not None and n < logits.shape[-1]:
            # Rows past the tokenizer are padding; the reference cut them off at load.
            logits[..., n:] = torch.finfo(logits.dtype).min
        return logits

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        image_masks: Sequence[dict | None] | None = None,
        budgets: Sequence[int] | torch.Tensor | None = None,
        query_index: torch.Tensor | None = None,
        *,
        selector: str | None = None,
        kmeans_clusters: int | None = None,
        kmeans_iters: int | None = None,
        kmeans_mode: str | None = None,
        seed: int | None = None,
        image_sizes: torch.Tensor | None = None,
        past_key_values: Any = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Training / scoring forward. With `pixel_values`, the placeholders in `input_ids`
        are replaced by the selected visual tokens (selection without gradient; gradient flows
        through the kept tokens and the members of merged groups).

        With `labels` and no `query_index`, relevance is scored from the prompt only: the query is
        the token before the first supervised label, so the answer never influences which visual
        tokens are kept. `config.compat == "reference"` reproduces the reference's training
        behaviour instead (the query is the last token of the whole sequence, i.e. the answer).

        Args:
            input_ids: `[B, L]` token ids; each row holds one run of `image_token_id` placeholders
                when `pixel_values` is given (as `UhrBatProcessor` builds them).
            attention_mask: `[B, L]`, 1 for real tokens (left or right padding).
            position_ids: `[B, L]`; default from the attention mask after splicing.
            cache / past_key_values: the language model's KV cache (either name).
            inputs_embeds: `[B, L, H]` already spliced embeddings (then `pixel_values` is unused).
            pixel_values: `[B, T, 3, tile, tile]` tiles of each row's image (`T` = tiles of the
                whole pyramid, 228 for 672/1344/2688/4032 with 336-px tiles).
            labels: `[B, L]` target ids, -100 = not supervised.
            use_cache: return the KV cache.
            logits_to_keep: keep logits of the last N positions only (0 = all).
            image_masks: per row, `None` or `{scale: segment ids}` for `selector="segments"`.
            budgets: visual tokens kept per scale, `[S]` (or `[B, S]` of identical rows, as the
                processor returns); default `config.budgets`.
            query_index: `[B]` position of each row's relevance query token (see above).
            selector: `"kmeans"` | `"segments"` | `"topk"`; default `config.selector`.
            kmeans_clusters: clusters per scale, 0 = the scale's budget; default the config's.
            kmeans_iters: maximum Lloyd iterations (>= 1); default the config's.
            kmeans_mode: `"fast"` | `"exact"`; default the config's.
            seed: K-Means initialisation seed; default the config's.
            image_sizes: `[B, 2]` original (width, height) from the processor; not needed here.
            kwargs: passed to the language model (e.g. `output_hidden_states`).
        Returns:
            `CausalLMOutputWithPast`: `logits` `[B, L, V]` (rows past the tokenizer masked to the
            dtype minimum), `loss` when `labels` are given, `past_key_values` with `use_cache`.
        """
        if cache is None:
            cache = past_key_values
        if pixel_values is not None and inputs_embeds is None:
            sel_kw = selection_kwargs(budgets, selector, kmeans_clusters, kmeans_iters, kmeans_mode, seed)
            if query_index is None and labels is not None and self.config.compat != "reference":
                query_index = _last_prompt_index(labels)
            inputs_embeds, attention_mask = self.prepare_inputs_embeds(
                input_ids, attention_mask, pixel_values, masks=image_masks, query_index=query_index, **sel_kw
            )
            if position_ids is None and attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
            input_ids = None
        elif input_ids is not None and inputs_embeds is None and (input_ids == self.config.image_token_id).any():
            raise PromptError("input_ids contain <image> placeholders but no pixel_values were given")
        out = self.language_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )
        if out.logits is not None:
            out.logits = self._mask_vocab(out.logits)
        return out

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        next_sequence_length: int | None = None,
        cache: Any = None,
        attention_mask: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        is_first_iteration: bool | None = False,
        **kwargs: Any,
    ) -> dict[str, Any]:
        # Visual tokens are spliced into `inputs_embeds` before generation starts (see
        # `generate`), so the decoding steps only ever see text ids.
        kwargs.pop("pixel_values", None)
        return super().prepare_inputs_for_generation(
            input_ids,
            next_sequence_length=next_sequence_length,
            cache=cache,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            is_first_iteration=is_first_iteration,
            **kwargs,
        )

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_masks: Sequence[dict | None] | None = None,
        budgets: Sequence[int] | torch.Tensor | None = None,
        traces: list[ImageTrace] | None = None,
        *,
        selector: str | None = None,
        kmeans_clusters: int | None = None,
        kmeans_iters: int | None = None,
        kmeans_mode: str | None = None,
        seed: int | None = None,
        image_sizes: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """Generate an answer; returns only the new (answer) tokens.

        Accepts the processor output (`input_ids`, `attention_mask`, `pixel_values`,
        `image_sizes`, optionally `budgets`) and the released model card's call signature
        (`inputs=`, `multiscale_pixels=`, `multiscale_topk=`, `multiscale_target_sizes=`,
        `multiscale_masks=`, `images=`, `modalities=`; see `uhrbat.modeling.compat`).

        Args:
            input_ids: `[B, L]` prompts, each with one run of `image_token_id` placeholders
                (left padding for batches).
            attention_mask: `[B, L]`; default all ones.
            pixel_values: `[B, T, 3, tile, tile]` tiles of each row's image; without it the
                model is a plain text LM (and placeholders are an error).
            image_masks: per row, `None` or `{scale: segment ids}` for `selector="segments"`.
            budgets: visual tokens kept per scale, `[S]` or `[B, S]`; default `config.budgets`.
            traces: optional per-row `ImageTrace` filled with relevance, selections and timings.
            selector / kmeans_clusters / kmeans_iters / kmeans_mode / seed: per-call selection
                options (see `forward`); default the config's.
            image_sizes: `[B, 2]` original (width, height) from the processor; not needed here.
            kwargs: generation options for `GenerationMixin.generate` (`max_new_tokens`,
                `do_sample`, `temperature`, `num_beams`, `repetition_penalty`, `streamer`, ...).
        Returns:
            `[B, N]` new token ids (or a `GenerateOutput` whose `sequences` hold only the new
            tokens, with `return_dict_in_generate=True`).
        """
        if "multiscale_pixels" in kwargs or "inputs" in kwargs and pixel_values is None:
            input_ids, attention_mask, pixel_values, image_masks, budgets, kwargs = from_reference_call(
                self, input_ids, attention_mask, kwargs
            )
            # With reference masks the call implies the segments selector (unless one was given).
            implied = kwargs.pop("selector", None)
            selector = selector or implied
        for k in ("modalities", "images"):  # model-card arguments with no meaning here
            kwargs.pop(k, None)
        sel_kw = selection_kwargs(budgets, selector, kmeans_clusters, kmeans_iters, kmeans_mode, seed)
        if input_ids is None:
            raise PromptError("generate needs input_ids (use UhrBatProcessor)")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if pixel_values is None:
            if (input_ids == self.config.image_token_id).any():
                raise PromptError("input_ids contain <image> placeholders but no pixel_values were given")
            out = super().generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
            return _strip_prompt(out, input_ids.shape[1])
        device = self.get_input_embeddings().weight.device
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        inputs_embeds, attention_mask = self.prepare_inputs_embeds(
            input_ids, attention_mask, pixel_values, masks=image_masks, traces=traces, **sel_kw
        )
        return self.generate_from_embeds(input_ids, inputs_embeds, attention_mask, **kwargs)

    @torch.no_grad()
    def generate_from_embeds(
        self, input_ids: torch.LongTensor, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Any
    ) -> Any:
        """Generate from prompts whose visual tokens are already spliced (`prepare_inputs_embeds`).

        `input_ids` `[B, L]` (placeholders included) only feed logits processors such as
        `repetition_penalty`; returns only the new tokens."""
        max_pos = self.config.text_config.max_position_embeddings
        new = kwargs.get("max_new_tokens") or 0
        if input_ids.shape[1] + new > max_pos:
            raise BudgetError(
                f"prompt ({input_ids.shape[1]}) + max_new_tokens ({new}) exceeds max_position_embeddings {max_pos}"
            )
        out = super().generate(
            input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs
        )
        return _strip_prompt(out, input_ids.shape[1])


def selection_kwargs(
    budgets: Sequence[int] | torch.Tensor | None = None,
    selector: str | None = None,
    kmeans_clusters: int | None = None,
    kmeans_iters: int | None = None,
    kmeans_mode: str | None = None,
    seed: int | None = None,
) -> dict[str, Any]:
    """The given selection options (None = the config's) for `SelectionOptions.resolve`.

    `budgets` may be a list, a `[S]` tensor or the processor's `[B, S]` tensor (rows identical)."""
    if torch.is_tensor(budgets):
        budgets = (budgets[0] if budgets.dim() == 2 else budgets).tolist()
    given = {
        "budgets": budgets,
        "selector": selector,
        "kmeans_clusters": kmeans_clusters,
        "kmeans_iters": kmeans_iters,
        "kmeans_mode": kmeans_mode,
        "seed": seed,
    }
    return {k: v for k, v in given.items() if v is not None}


def _last_prompt_index(labels: torch.Tensor) -> torch.Tensor:
    """`[B]` index of the token before each row's first supervised label (-100 = ignored)."""
    supervised = labels != -100
    if not supervised.any(dim=1).all():
        raise PromptError("a training row has no supervised (answer) tokens")
    return supervised.int().argmax(dim=1) - 1


def _strip_prompt(out: Any, prompt_len: int) -> Any:
    """Keep only the generated tokens (HF returns prompt + answer when input_ids are given)."""
    if torch.is_tensor(out):
        return out[:, prompt_len:] if out.shape[1] > prompt_len else out
    if getattr(out, "sequences", None) is not None and out.sequences.shape[1] > prompt_len:
        out.sequences = out.sequences[:, prompt_len:]
    return out
