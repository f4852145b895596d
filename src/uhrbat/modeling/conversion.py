"""Loading reference-format (`LlavaQwenForCausalLM`) checkpoints through an explicit key map.

Reference key                                        ->  our key
model.embed_tokens.* / model.layers.* / model.norm.* ->  language_model.model.*
lm_head.weight                                       ->  language_model.lm_head.weight
model.mm_projector.{0,2}.*                           ->  projector.{fc1,fc2}.*
model.multiscale_token_mlp.{0,2}.* (or the duplicate
  top-level multiscale_token_mlp.{0,2}.*)            ->  token_mlp.{fc1,fc2}.*
model.scale_pos_residuals.<scale>                    ->  scale_residuals.grids.<scale>
model.vision_tower.vision_tower.vision_model.*       ->  vision_tower.*  (CLIPVisionModel, transformers 5 layout)
model.text_to_vision_proj.*                          ->  ignored (unused by any code path)

Every parameter of the model must be filled (strict): missing scale residuals or weights
raise `CheckpointError` instead of being silently re-randomised (method §7.4).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from uhrbat.configuration import UhrBatConfig
from uhrbat.errors import CheckpointError
from uhrbat.modeling.hub import local_dir, weight_files
from uhrbat.modeling.modeling_uhrbat import UhrBatForConditionalGeneration

_RULES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"^model\.mm_projector\.0\.(.*)$"), r"projector.fc1.\1"),
    (re.compile(r"^model\.mm_projector\.2\.(.*)$"), r"projector.fc2.\1"),
    (re.compile(r"^(?:model\.)?multiscale_token_mlp\.0\.(.*)$"), r"token_mlp.fc1.\1"),
    (re.compile(r"^(?:model\.)?multiscale_token_mlp\.2\.(.*)$"), r"token_mlp.fc2.\1"),
    (re.compile(r"^model\.scale_pos_residuals\.(\d+)$"), r"scale_residuals.grids.\1"),
    (re.compile(r"^model\.vision_tower\.vision_tower\.vision_model\.(.*)$"), r"vision_tower.\1"),
    (re.compile(r"^model\.((?:embed_tokens|layers|norm)\b.*)$"), r"language_model.model.\1"),
    (re.compile(r"^lm_head\.(.*)$"), r"language_model.lm_head.\1"),
]
_IGNORED = re.compile(r"^model\.(text_to_vision_proj|vision_resampler|image_newline)\b")


def map_reference_key(key: str) -> str | None:
    """Our parameter name for a reference state-dict key, or None for ignored keys."""
    if _IGNORED.match(key):
        return None
    for pattern, repl in _RULES:
        if pattern.match(key):
            return pattern.sub(repl, key)
    raise CheckpointError(f"unexpected key in reference checkpoint: {key}")


def _resolve_vision_path(directory: Path, ref: dict[str, Any], vision_tower: str | os.PathLike | None) -> Path | None:
    cand = vision_tower or os.environ.get("UHR_BAT_VISION_TOWER") or ref.get("mm_vision_tower")
    if not cand:
        return None
    for p in (Path(cand), directory / str(cand)):
        if p.is_dir() and (p / "config.json").exists():
            return p.resolve()
    return None


def reference_config(
    directory: Path, vision_tower: str | os.PathLike | None = None
) -> tuple[UhrBatConfig, Path | None]:
    """Our config for a reference checkpoint folder, plus the vision-tower folder if local."""
    from transformers import CLIPVisionConfig

    ref = json.loads((directory / "config.json").read_text())
    vpath = _resolve_vision_path(directory, ref, vision_tower)
    vcfg = CLIPVisionConfig.from_pretrained(str(vpath)) if vpath is not None else None
    # Name the tower that was looked for: a given --vision-tower, not the config's entry.
    cand = str(vision_tower or os.environ.get("UHR_BAT_VISION_TOWER") or ref.get("mm_vision_tower") or "")
    if vcfg is None and cand.rstrip("/").split("/")[-1] not in ("clip-vit-large-patch14-336", ""):
        raise CheckpointError(
            f"vision tower {cand!r} not found (no folder with a config.json there); "
            "pass --vision-tower PATH (a CLIPVisionModel folder)"
        )
    return UhrBatConfig.from_reference_dict(ref, vcfg), vpath


def load_reference_checkpoint(
    directory: str | os.PathLike,
    vision_tower: str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    **config_overrides: Any,
):
    """Build a `UhrBatForConditionalGeneration` from a reference-format folder."""
    from accelerate import init_empty_weights

    directory = Path(directory)
    config, vpath = reference_config(directory, vision_tower)
    for k, v in config_overrides.items():
        setattr(config, k, v)
    config.validate_uhrbat()
    dtype = dtype or (config.dtype if isinstance(config.dtype, torch.dtype) else torch.float32)
    with init_empty_weights(include_buffers=False):
        model = UhrBatForConditionalGeneration(config)
    expected = dict(model.named_parameters())
    loaded: dict[str, torch.Tensor] = {}
    for f in weight_files(directory):
        with safe_open(str(f), framework="pt", device=str(device)) as fh:
            for key in fh.keys():
                ours = map_reference_key(key)
                if ours is None or ours in loaded:
                    continue  # ignored, or the duplicate alias of the token MLP
                loaded[ours] = fh.get_tensor(key)
    if not any(k.startswith("vision_tower.") for k in loaded) and vpath is None:
        # The release names the tower by hub id (openai/clip-vit-large-patch14-336).
        name = str(
            vision_tower
            or os.environ.get("UHR_BAT_VISION_TOWER")
            or json.loads((directory / "config.json").read_text()).get("mm_vision_tower")
            or ""
        )
        if not name:
            raise CheckpointError(
                f"{directory}: no vision tower weights in the checkpoint and no mm_vision_tower; pass --vision-tower"
            )
        vpath = local_dir(name)
    if not any(k.startswith("vision_tower.") for k in loaded):
        vfiles = weight_files(vpath)
        for f in vfiles:
            with safe_open(str(f), framework="pt", device=str(device)) as fh:
                for key in fh.keys():
                    if key.startswith("vision_model."):
                        loaded["vision_tower." + key[len("vision_model.") :]] = fh.get_tensor(key)
    # The vision tower's post_layernorm / unused head may be absent; everything else is required.
    missing = [k for k in expected if k not in loaded]
    if missing:
        residual = [k for k in missing if k.startswith("scale_residuals.")]
        hint = " (the scale residuals the model was trained with; refusing to re-randomise them)" if residual else ""
        raise CheckpointError(f"{directory}: {len(missing)} weights missing, e.g. {', '.join(missing[:4])}{hint}")
    unexpected = [k for k in loaded if k not in expected]
    if unexpected:
        raise CheckpointError(f"{directory}: unexpected weights {', '.join(unexpected[:4])}")
    for k, t in loaded.items():
        want = expected[k].shape
        if tuple(t.shape) != tuple(want):
            if k.endswith(("embed_tokens.weight", "lm_head.weight")) and t.shape[1:] == want[1:]:
                raise CheckpointError(
                    f"{k}: checkpoint has {t.shape[0]} vocabulary rows but config vocab_size is {want[0]}"
                )
            raise CheckpointError(f"{k}: shape {tuple(t.shape)} in checkpoint, model expects {tuple(want)}")
        loaded[k] = t.to(dtype)
    model.load_state_dict(loaded, strict=True, assign=True)
    model.to(device=device)
    model.eval()
    return model
