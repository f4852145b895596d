"""`UhrBatConfig`: the composite configuration of a UHR-BAT model.

Nested `text_config` (Qwen2) and `vision_config` (CLIP vision) plus every knob of the
pyramid, the scoring pass and the token selection. `from_reference_dict` reads the
reference implementation's flat `llava_qwen` `config.json`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from transformers import AutoConfig
from transformers.configuration_utils import PreTrainedConfig, SubConfigSpec

from uhrbat.configuration.geometry import TokenGeometry
from uhrbat.errors import ConfigError
from uhrbat.options import COMPAT_MODES, KMEANS_MODES
from uhrbat.selectors import selector_names

# openai/clip-vit-large-patch14-336, the tower every released checkpoint uses.
CLIP_L14_336 = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "patch_size": 14,
    "image_size": 336,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}


class UhrBatConfig(PreTrainedConfig):
    r"""Configuration of [`UhrBatForConditionalGeneration`].

    Args:
        vision_config: CLIP vision tower config (dict or `CLIPVisionConfig`); default ViT-L/14-336.
        text_config: Qwen2 config (dict or `Qwen2Config`).
        scales: square pyramid sides in pixels, ascending (default 672/1344/2688/4032).
        tile_size: side of a tile (the CLIP input), 336.
        budgets: visual tokens kept per scale (default 80/320/600/2000).
        selector: default token selector, a registered name (`uhrbat.selectors`: kmeans, segments, topk, divprune, dpp).
        kmeans_clusters: clusters per scale; `None` or 0 means K = the scale's budget.
        kmeans_iters: maximum Lloyd iterations.
        kmeans_coord_scale / kmeans_feat_scale: weights of the tile-local (x, y) and of the
            L2-normalised feature in the clustering vector.
        kmeans_mode: `"fast"` (vectorised, bound-pruned) or `"exact"` (reference loop order).
        seed: seed of the K-Means initialisation generator.
        base_scale: scale whose tokens are scored by the LLM (672).
        scale_residual_base: cap of the per-scale residual grid side (64).
        enable_scale_pos_residual: reference flag; when true the selected tokens carry the
            scale residual twice (what the released weights were trained with), else zero times.
        vision_feature_layer: CLIP hidden state used (-2 = penultimate).
        image_token_id: id of the `<image>` placeholder (a real, non-negative id).
        max_context: maximum LLM sequence length (visual tokens + prompt + new tokens).
        vocab_in_use: number of real vocabulary rows; logits beyond are masked (the reference
            resized the embeddings to the tokenizer length at load).
        compat: `"none"` (fixed behaviour) or `"reference"` (reproduce the reference's
            inference bugs: ChatML specials overwritten with EOS, ...).
        encode_chunk_size: tiles per CLIP batch (bounds memory).

    Example:
        >>> from uhrbat import UhrBatConfig
        >>> UhrBatConfig().budgets
        [80, 320, 600, 2000]
    """

    model_type = "uhrbat"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(
            config_class=AutoConfig, model_type="clip_vision_model", init_kwargs=CLIP_L14_336
        ),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen2"),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    scales: list[int] | None = None
    tile_size: int = 336
    budgets: list[int] | None = None
    selector: str = "kmeans"
    kmeans_clusters: int | None = None
    kmeans_iters: int = 10
    kmeans_coord_scale: float = 0.05
    kmeans_feat_scale: float = 1.0
    kmeans_mode: str = "fast"
    seed: int = 0
    base_scale: int = 672
    scale_residual_base: int = 64
    enable_scale_pos_residual: bool = True
    vision_feature_layer: int = -2
    image_token_id: int | None = None
    max_context: int = 5000
    vocab_in_use: int | None = None
    compat: str = "none"
    encode_chunk_size: int = 16
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        if self.scales is None:
            self.scales = [672, 1344, 2688, 4032]
        if self.budgets is None:
            self.budgets = [80, 320, 600, 2000]
        self.scales = [int(s) for s in self.scales]
        self.budgets = [int(b) for b in self.budgets]
        self.validate_uhrbat()

    # ------------------------------------------------------------------ validation
    def validate_uhrbat(self) -> None:
        """Raise `ConfigError` (a `ValueError`) naming the first invalid field."""
        if not self.scales:
            raise ConfigError("scales must list at least one pyramid side")
        if any(s < self.tile_size for s in self.scales):
            raise ConfigError(f"every scale must be >= tile_size {self.tile_size}, got {self.scales}")
        if sorted(set(self.scales)) != list(self.scales):
            raise ConfigError(f"scales must be strictly ascending, got {self.scales}")
        if self.tile_size % self.patch_size:
            raise ConfigError(f"tile_size {self.tile_size} is not a multiple of the CLIP patch {self.patch_size}")
        if self.base_scale not in self.scales:
            raise ConfigError(f"base_scale {self.base_scale} must be one of scales {self.scales}")
        if len(self.budgets) != len(self.scales):
            raise ConfigError(f"budgets has {len(self.budgets)} values but there are {len(self.scales)} scales")
        if any(b < 0 for b in self.budgets):
            raise ConfigError(f"budgets must be >= 0, got {self.budgets}")
        if self.selector not in selector_names():
            raise ConfigError(f"selector must be one of {', '.join(selector_names())}, got {self.selector!r}")
        if self.kmeans_mode not in KMEANS_MODES:
            raise ConfigError(f"kmeans_mode must be one of {KMEANS_MODES}, got {self.kmeans_mode!r}")
        if self.compat not in COMPAT_MODES:
            raise ConfigError(f"compat must be one of {COMPAT_MODES}, got {self.compat!r}")
        if self.kmeans_clusters is not None and self.kmeans_clusters < 0:
            raise ConfigError(f"kmeans_clusters must be >= 0 or None, got {self.kmeans_clusters}")
        if self.kmeans_iters < 1:
            raise ConfigError(f"kmeans_iters must be >= 1, got {self.kmeans_iters}")
        if self.scale_residual_base < 1:
            raise ConfigError(f"scale_residual_base must be >= 1, got {self.scale_residual_base}")
        if self.max_context < 1:
            raise ConfigError(f"max_context must be >= 1, got {self.max_context}")
        if self.encode_chunk_size < 1:
            raise ConfigError(f"encode_chunk_size must be >= 1, got {self.encode_chunk_size}")
        if self.image_token_id is not None and self.image_token_id < 0:
            raise ConfigError(f"image_token_id must be a non-negative token id, got {self.image_token_id}")
        n_layers = self.vision_config.num_hidden_layers
        if not -(n_layers + 1) <= self.vision_feature_layer <= n_layers:
            raise ConfigError(
                f"vision_feature_layer {self.vision_feature_layer} out of range for {n_layers} CLIP layers"
            )

    # ------------------------------------------------------------------ derived values
    @property
    def patch_size(self) -> int:
        return int(self.vision_config.patch_size)

    @property
    def geometry(self) -> TokenGeometry:
        """Tile and patch sides: how kept tokens map back to pixels (GeoJSON, overlays)."""
        return TokenGeometry(self.tile_size, self.patch_size)

    @property
    def tokens_per_side(self) -> int:
        """Patch tokens per tile side (24 for 336 / 14)."""
        return self.geometry.tokens_per_side

    @property
    def tokens_per_tile(self) -> int:
        return self.geometry.tokens_per_tile

    def grid(self, scale: int) -> int:
        """Tiles per side at `scale` (remainder pixels are dropped, as in the reference)."""
        return self.geometry.grid(scale)

    def num_tiles(self, scale: int) -> int:
        return self.grid(scale) ** 2

    def num_tokens(self, scale: int) -> int:
        return self.num_tiles(scale) * self.tokens_per_tile

    def residual_grid(self, scale: int) -> int:
        """Side of the learnable residual grid: max(1, min(scale // patch, base))."""
        return max(1, min(scale // self.patch_size, self.scale_residual_base))

    # ------------------------------------------------------------------ reference format
    @classmethod
    def from_reference_dict(
        cls, ref: dict[str, Any], vision_config: dict | PreTrainedConfig | None = None
    ) -> UhrBatConfig:
        """Build a config from the reference's flat `llava_qwen` `config.json` dict."""
        ref = dict(ref)
        projector = ref.get("mm_projector_type", "mlp2x_gelu")
        if projector != "mlp2x_gelu":
            raise ConfigError(f"unsupported mm_projector_type {projector!r} (only 'mlp2x_gelu')")
        feature = ref.get("mm_vision_select_feature", "patch")
        if feature != "patch":
            raise ConfigError(f"unsupported mm_vision_select_feature {feature!r} (only 'patch')")
        qwen_keys = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "hidden_act",
            "max_position_embeddings",
            "initializer_range",
            "rms_norm_eps",
            "rope_theta",
            "attention_dropout",
            "use_sliding_window",
            "sliding_window",
            "max_window_layers",
            "bos_token_id",
            "eos_token_id",
            "tie_word_embeddings",
            "use_cache",
        )
        text = {k: ref[k] for k in qwen_keys if k in ref}
        text["model_type"] = "qwen2"  # rope_scaling is dropped: the reference model class forces None
        if text.get("sliding_window") is None:
            text.pop("sliding_window", None)
        if vision_config is None:
            vision_config = dict(CLIP_L14_336, model_type="clip_vision_model")
        n_clusters = ref.get("kmeans_num_clusters")
        iters = ref.get("kmeans_max_iters")
        topk = ref.get("multiscale_topk")
        return cls(
            vision_config=vision_config,
            text_config=text,
            scales=list(ref.get("multiscale_target_sizes") or [672, 1344, 2688, 4032]),
            budgets=[int(x) for x in topk] if topk else None,
            kmeans_clusters=int(n_clusters) if n_clusters else None,
            kmeans_iters=int(iters) if iters else 10,
            kmeans_coord_scale=float(ref.get("kmeans_coord_scale", 0.05) or 0.05),
            kmeans_feat_scale=float(ref.get("kmeans_feat_scale", 1.0) or 1.0),
            base_scale=int(ref.get("multiscale_base_attention_size", 672) or 672),
            scale_residual_base=int(ref.get("scale_residual_base", 64) or 64),
            enable_scale_pos_residual=bool(ref.get("enable_scale_pos_residual", False)),
            vision_feature_layer=int(ref.get("mm_vision_select_layer", -2)),
            max_context=int(ref.get("tokenizer_model_max_length") or ref.get("max_position_embeddings") or 5000),
            dtype=ref.get("torch_dtype") or ref.get("dtype"),
            bos_token_id=ref.get("bos_token_id"),
            eos_token_id=ref.get("eos_token_id"),
            pad_token_id=ref.get("pad_token_id"),
        )


def is_reference_config(d: dict[str, Any]) -> bool:
    """True for the reference's `llava_qwen` / `LlavaQwenForCausalLM` config dicts."""
    archs = d.get("architectures") or []
    return d.get("model_type") in ("llava_qwen", "uhr_bat", "llava") or any("Llava" in a for a in archs)


def is_reference_checkpoint(directory: str | os.PathLike) -> bool:
    """True when the folder `directory` holds a reference-format (`LlavaQwenForCausalLM`) checkpoint."""
    cfg = Path(directory) / "config.json"
    return cfg.is_file() and is_reference_config(json.loads(cfg.read_text()))
