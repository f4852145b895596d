"""One entry point that loads a model + processor from any supported checkpoint.

Accepts a local folder or a hub id, in this package's format (`save_pretrained`) or the
reference's `LlavaQwenForCausalLM` format (e.g. the released `RL-MIND/UHR-BAT`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from uhrbat.errors import CheckpointError
from uhrbat.processing.image_processing_uhrbat import UhrBatImageProcessor
from uhrbat.processing.processing_uhrbat import UhrBatProcessor

DEFAULT_MODEL = "RL-MIND/UHR-BAT"
_DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model", "tokenizer*"]


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16, "auto": None}
    if dtype not in names:
        raise CheckpointError(f"unknown dtype {dtype!r}; use one of {', '.join(names)}")
    return names[dtype]


def local_dir(model: str | os.PathLike) -> Path:
    """A local folder for `model`, downloading a hub snapshot (weights as safetensors only)."""
    p = Path(model)
    if p.is_dir():
        return p
    if p.exists():
        raise CheckpointError(f"{p} is a file, not a checkpoint folder")
    if str(model).startswith((".", "/")) or os.sep in str(model) and str(model).count("/") != 1:
        raise CheckpointError(f"checkpoint folder not found: {model}")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(model), allow_patterns=_DOWNLOAD_PATTERNS))
    except Exception as e:  # offline, unknown repo, auth
        first = (str(e).strip().splitlines() or [""])[0]
        raise CheckpointError(f"could not fetch {model!r} from the hub ({type(e).__name__}: {first}); pass a local folder") from e


def load(
    model: str | os.PathLike = DEFAULT_MODEL,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    vision_tower: str | os.PathLike | None = None,
    attn_implementation: str | None = None,
    **config_overrides: Any,
):
    """Load `(model, processor)`; `config_overrides` set UhrBatConfig fields (budgets, compat, ...)."""
    from uhrbat.modeling.conversion import is_reference_checkpoint, load_reference_checkpoint, reference_config
    from uhrbat.modeling.modeling_uhrbat import UhrBatForConditionalGeneration

    directory = local_dir(model)
    if not (directory / "config.json").exists():
        raise CheckpointError(f"{directory} has no config.json; not a checkpoint folder")
    torch_dtype = resolve_dtype(dtype, device)
    if is_reference_checkpoint(directory):
        net = load_reference_checkpoint(directory, vision_tower=vision_tower, dtype=torch_dtype, device=device, **config_overrides)
        _, vpath = reference_config(directory, vision_tower)
        ip = UhrBatImageProcessor.from_pretrained(vpath or directory, scales=net.config.scales, tile_size=net.config.tile_size)
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(str(directory), config=net.config.text_config)
        except Exception as e:
            raise CheckpointError(f"{directory}: tokenizer files missing or unreadable ({e})") from e
        vocab_in_use = len(tok)
        processor = UhrBatProcessor(ip, tok, budgets=net.config.budgets, max_context=net.config.max_context, compat=net.config.compat)
        net.config.image_token_id = processor.image_token_id
        net.config.vocab_in_use = min(vocab_in_use, net.config.text_config.vocab_size)
        if net.config.pad_token_id is None:
            net.config.pad_token_id = tok.pad_token_id
    else:
        # device_map loads the shards straight onto the accelerator (no full copy in host RAM).
        placement = {} if str(device) == "cpu" else {"device_map": str(device)}
        net = UhrBatForConditionalGeneration.from_pretrained(
            str(directory), dtype=torch_dtype, **placement, **config_overrides
        ).to(device)
        processor = UhrBatProcessor.from_pretrained(
            directory, budgets=net.config.budgets, max_context=net.config.max_context, compat=net.config.compat
        )
        if net.config.image_token_id != processor.image_token_id:
            raise CheckpointError(
                f"{directory}: config image_token_id {net.config.image_token_id} != tokenizer's <image> id {processor.image_token_id}"
            )
    if attn_implementation:
        # Only the LLM: CLIP stays on sdpa, which is what the reference's features were made with.
        net.language_model.set_attn_implementation(attn_implementation)
    _configure_generation(net, processor)
    net.eval()
    return net, processor


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
