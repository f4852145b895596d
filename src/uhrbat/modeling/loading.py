"""The one loading entry: `load(model)` -> `(model, processor)` from any supported checkpoint.

Accepts a local folder or a hub id (`uhrbat.modeling.hub`), in this package's format
(`save_pretrained`, also what `AutoModel` / `AutoProcessor` read) or the reference's
`LlavaQwenForCausalLM` format (e.g. the released `RL-MIND/UHR-BAT`, mapped by
`uhrbat.modeling.conversion`). This is the only place that decides between the two.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from uhrbat.auto import register_auto_classes
from uhrbat.configuration import is_reference_checkpoint
from uhrbat.devices import resolve_device
from uhrbat.errors import CheckpointError
from uhrbat.modeling.conversion import load_reference_checkpoint, reference_config
from uhrbat.modeling.hub import DEFAULT_MODEL, local_dir
from uhrbat.modeling.modeling_uhrbat import UhrBatForConditionalGeneration
from uhrbat.processing.image_processing_uhrbat import UhrBatImageProcessor
from uhrbat.processing.processing_uhrbat import UhrBatProcessor

__all__ = ["DEFAULT_MODEL", "load", "local_dir", "resolve_dtype"]


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device) -> torch.dtype | None:
    """`"fp32" | "bf16" | "fp16" | "auto"` (or a torch dtype, or None) -> torch dtype or None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {
        "fp32": torch.float32,
        "float32": torch.float32,
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        "fp16": torch.float16,
        "float16": torch.float16,
        "auto": None,
    }
    if dtype not in names:
        raise CheckpointError(f"unknown dtype {dtype!r}; use one of {', '.join(names)}")
    return names[dtype]


def load(
    model: str | os.PathLike = DEFAULT_MODEL,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    vision_tower: str | os.PathLike | None = None,
    attn_implementation: str | None = None,
    **config_overrides: Any,
) -> tuple[UhrBatForConditionalGeneration, UhrBatProcessor]:
    """Load `(model, processor)`; `config_overrides` set UhrBatConfig fields (budgets, compat, ...)."""
    device = resolve_device(device)  # one clear line when e.g. CUDA is not available here
    directory = local_dir(model)
    if not (directory / "config.json").exists():
        raise CheckpointError(f"{directory} has no config.json; not a checkpoint folder")
    torch_dtype = resolve_dtype(dtype, device)
    if is_reference_checkpoint(directory):
        net, processor = _load_reference(directory, device, torch_dtype, vision_tower, config_overrides)
    else:
        net, processor = _load_ours(directory, device, torch_dtype, config_overrides)
    attn_implementation = attn_implementation or default_attn_implementation(device, net.dtype)
    if attn_implementation:
        # Only the LLM: CLIP stays on sdpa, which is what the reference's features were made with.
        net.language_model.set_attn_implementation(attn_implementation)
    _configure_generation(net, processor)
    net.eval()
    return net, processor


def default_attn_implementation(device: torch.device, dtype: torch.dtype) -> str | None:
    """The LLM attention used when none is asked for: flash-attention-2 on a CUDA device in bf16/fp16
    when the `flash-attn` package is installed, else `None` (transformers' default, sdpa)."""
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return None
    import importlib.util

    return "flash_attention_2" if importlib.util.find_spec("flash_attn") is not None else None


def _geometry(config: Any) -> dict[str, Any]:
    """The image processor's pyramid settings, from the model config (one source of truth)."""
    return {"scales": list(config.scales), "tile_size": config.tile_size, "patch_size": config.patch_size}


def _load_ours(
    directory: Path, device: Any, dtype: torch.dtype | None, overrides: dict[str, Any]
) -> tuple[UhrBatForConditionalGeneration, UhrBatProcessor]:
    # device_map loads the shards straight onto the accelerator (no full copy in host RAM).
    placement = {} if str(device) == "cpu" else {"device_map": str(device)}
    # `UhrBatProcessor.from_pretrained` finds its image processor through `AutoImageProcessor`:
    # register here too, for the `uhrbat` command, which skips it at import (`_uhrbat_launcher`).
    register_auto_classes()
    net = UhrBatForConditionalGeneration.from_pretrained(str(directory), dtype=dtype, **placement, **overrides)
    net = net.to(device)
    cfg = net.config
    processor = UhrBatProcessor.from_pretrained(
        directory, budgets=cfg.budgets, max_context=cfg.max_context, compat=cfg.compat, **_geometry(cfg)
    )
    if cfg.image_token_id != processor.image_token_id:
        raise CheckpointError(
            f"{directory}: config image_token_id {cfg.image_token_id} != "
            f"tokenizer's <image> id {processor.image_token_id}"
        )
    return net, processor


def _load_reference(
    directory: Path, device: Any, dtype: torch.dtype | None, vision_tower: Any, overrides: dict[str, Any]
) -> tuple[UhrBatForConditionalGeneration, UhrBatProcessor]:
    from transformers import AutoTokenizer

    net = load_reference_checkpoint(directory, vision_tower=vision_tower, dtype=dtype, device=device, **overrides)
    _, vpath = reference_config(directory, vision_tower)
    ip = UhrBatImageProcessor(**_clip_normalisation(vpath or directory), **_geometry(net.config))
    try:
        tok = AutoTokenizer.from_pretrained(str(directory), config=net.config.text_config)
    except Exception as e:
        raise CheckpointError(f"{directory}: tokenizer files missing or unreadable ({e})") from e
    vocab_in_use = len(tok)
    cfg = net.config
    processor = UhrBatProcessor(ip, tok, budgets=cfg.budgets, max_context=cfg.max_context, compat=cfg.compat)
    cfg.image_token_id = processor.image_token_id
    cfg.vocab_in_use = min(vocab_in_use, cfg.text_config.vocab_size)
    if cfg.pad_token_id is None:
        cfg.pad_token_id = tok.pad_token_id
    return net, processor


def _clip_normalisation(directory: Path) -> dict[str, Any]:
    """`image_mean` / `image_std` of the CLIPImageProcessor config in `directory` (the vision
    tower's folder); CLIP's defaults when there is none."""
    path = directory / "preprocessor_config.json"
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    return {k: data[k] for k in ("image_mean", "image_std") if k in data}


def _configure_generation(net: Any, processor: UhrBatProcessor) -> None:
    """Greedy defaults; EOS = <|im_end|> (and <|endoftext|>), pad = tokenizer pad."""
    tok = processor.tokenizer
    gc = net.generation_config
    eos = [i for i in (tok.eos_token_id, tok.convert_tokens_to_ids("<|endoftext|>")) if isinstance(i, int) and i >= 0]
    gc.eos_token_id = list(dict.fromkeys(eos)) or gc.eos_token_id
    gc.pad_token_id = tok.pad_token_id
    gc.bos_token_id = None
    gc.do_sample = False
    gc.temperature = None
    gc.top_p = None
    gc.top_k = None
