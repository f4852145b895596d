"""Which parameters train: the freeze policy, LoRA / QLoRA through `peft`, and merged saves.

Parts (`--train`, comma-separated):

| part | module | reference name |
|---|---|---|
| `vision_projector` | `model.projector` (CLIP -> LLM MLP) | `mm_mlp_adapter` |
| `token_mlp` | `model.token_mlp` (multiscale token MLP) | (inside `mm_language_model`) |
| `llm` | `model.language_model` (embeddings, decoder, norm, LM head) | `mm_language_model` |
| `scale_residuals` | `model.scale_residuals` | `scale_residuals` (never actually trained, §5.3) |

The reference default is `vision_projector,token_mlp,llm`. CLIP (`vision_tower`) is always frozen:
the model encodes tiles without gradient.

With LoRA (`LoraSettings(r>0)`) the LLM's base weights stay frozen and low-rank adapters on its
linear layers train instead (when `llm` is listed); the other listed parts train fully. `quantize`
("4bit"/"8bit", QLoRA) loads the LLM's linear layers through bitsandbytes (CUDA only).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from uhrbat.errors import ConfigError

PARTS = {
    "vision_projector": "projector",
    "token_mlp": "token_mlp",
    "llm": "language_model",
    "scale_residuals": "scale_residuals",
}
ALIASES = {
    "projector": "vision_projector",
    "mm_mlp_adapter": "vision_projector",
    "mm_projector": "vision_projector",
    "language_model": "llm",
    "mm_language_model": "llm",
    "lm": "llm",
    "multiscale_token_mlp": "token_mlp",
    "mlp": "token_mlp",
    "scale_pos_residuals": "scale_residuals",
    "residuals": "scale_residuals",
}
REFERENCE_DEFAULT = ("vision_projector", "token_mlp", "llm")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def parse_parts(spec: str | Iterable[str] | None) -> list[str]:
    """`"vision_projector,token_mlp,llm"` -> validated canonical part names."""
    if spec is None:
        return list(REFERENCE_DEFAULT)
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s and s.strip()]
    out: list[str] = []
    for it in items:
        name = ALIASES.get(it, it)
        if name in ("vision_tower", "clip", "vision"):
            raise ConfigError(
                "the CLIP vision tower cannot be trained: tiles are encoded without gradient (method §5.2)"
            )
        if name not in PARTS:
            raise ConfigError(f"unknown trainable part {it!r}; choose from {', '.join(PARTS)}")
        if name not in out:
            out.append(name)
    if not out:
        raise ConfigError("--train names no part; nothing would train")
    return out


@dataclass
class LoraSettings:
    """LoRA on the LLM's linear layers (r = 0: off)."""

    r: int = 0
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    quantize: str | None = None  # None | "4bit" | "8bit" (QLoRA; CUDA + bitsandbytes)

    @property
    def enabled(self) -> bool:
        return self.r > 0

    def check(self) -> None:
        if self.r < 0:
            raise ConfigError(f"lora.r must be >= 0, got {self.r}")
        if self.quantize not in (None, "none", "4bit", "8bit"):
            raise ConfigError(f"lora.quantize must be 4bit, 8bit or none, got {self.quantize!r}")
        if self.quantize in ("4bit", "8bit") and not self.enabled:
            raise ConfigError(
                "lora.quantize needs LoRA (set lora.r > 0): quantized weights cannot be fine-tuned directly"
            )


def quantization_config(lora: LoraSettings, compute_dtype: torch.dtype | None) -> Any:
    """`BitsAndBytesConfig` quantizing only the LLM's linear layers (QLoRA)."""
    if lora.quantize in (None, "none"):
        return None
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as e:
        raise ConfigError("QLoRA needs bitsandbytes (pip install bitsandbytes) and a CUDA GPU") from e
    skip = ["vision_tower", "projector", "token_mlp", "scale_residuals", "lm_head"]
    if lora.quantize == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype or torch.bfloat16,
            llm_int8_skip_modules=skip,
        )
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)


def apply_freeze(model: nn.Module, parts: Iterable[str], lora: LoraSettings | None = None) -> dict[str, int]:
    """Set `requires_grad` per the policy (and inject LoRA); return trainable parameter counts per part."""
    parts = parse_parts(parts)
    lora = lora or LoraSettings()
    lora.check()
    model.requires_grad_(False)
    counts: dict[str, int] = {}
    for part in parts:
        module: nn.Module = getattr(model, PARTS[part])
        if part == "llm" and lora.enabled:
            inject_lora(model, lora)
            counts["llm (lora)"] = sum(p.numel() for n, p in module.named_parameters() if "lora_" in n)
            continue
        module.requires_grad_(True)
        counts[part] = sum(p.numel() for p in module.parameters())
    if lora.enabled and "llm" not in parts:
        raise ConfigError("LoRA adapts the LLM: add 'llm' to the trained parts or set lora.r = 0")
    return counts


def inject_lora(model: nn.Module, lora: LoraSettings) -> None:
    """Wrap the LLM's target linear layers with LoRA adapters (only the adapters train)."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as e:
        raise ConfigError("LoRA needs peft (pip install peft)") from e
    lm = model.language_model
    if lora.quantize in ("4bit", "8bit"):
        from peft import prepare_model_for_kbit_training

        prepare_model_for_kbit_training(lm, use_gradient_checkpointing=False)
    cfg = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        bias="none",
    )
    inject_adapter_in_model(cfg, lm, adapter_name="default")
    for n, p in lm.named_parameters():
        p.requires_grad_("lora_" in n)


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Activation checkpointing on the LLM's decoder layers (the only part with a big graph)."""
    lm = model.language_model
    fn = getattr(lm, "activation_checkpointing_enable", None) or lm.gradient_checkpointing_enable
    kw_name = (
        "activation_checkpointing_kwargs"
        if fn.__name__ == "activation_checkpointing_enable"
        else "gradient_checkpointing_kwargs"
    )
    fn(**{kw_name: {"use_reentrant": False}})


def has_lora(model: nn.Module) -> bool:
    return any("lora_" in n for n, _ in model.named_parameters())


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter weights (for resuming a LoRA run)."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if "lora_" in n}


def _dequantized_weight(base: nn.Module) -> torch.Tensor:
    w = base.weight
    if w.__class__.__name__ in ("Params4bit", "Int8Params"):
        from peft.utils.integrations import dequantize_module_weight

        return dequantize_module_weight(base)
    return w


def merged_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The model's state dict in this package's key names, with LoRA adapters folded into the base weights.

    Works from the (possibly gathered, e.g. ZeRO-3 / FSDP) `state_dict` when given: for every LoRA
    layer `W = W_base + scaling * B @ A`. Without LoRA this is the state dict unchanged, so a
    checkpoint saved from it loads with `UhrBatForConditionalGeneration.from_pretrained` / `uhrbat ask`.
    """
    sd = dict(state_dict if state_dict is not None else model.state_dict())
    if not has_lora(model):
        return sd
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        base = module.get_base_layer()
        key = f"{name}.base_layer.weight"
        quantized = base.weight.__class__.__name__ in ("Params4bit", "Int8Params")
        w = _dequantized_weight(base).detach() if (quantized or key not in sd) else sd[key]
        dtype = w.dtype if w.dtype.is_floating_point else torch.bfloat16
        w = w.float()
        for adapter in module.active_adapters:
            a_key, b_key = f"{name}.lora_A.{adapter}.weight", f"{name}.lora_B.{adapter}.weight"
            if a_key in sd and b_key in sd:
                a, b = sd[a_key].float(), sd[b_key].float()
            elif adapter in module.lora_A:
                a, b = module.lora_A[adapter].weight.detach().float(), module.lora_B[adapter].weight.detach().float()
            else:
                continue
            w = w + module.scaling[adapter] * (b.to(w.device) @ a.to(w.device))
        bias = sd.get(f"{name}.base_layer.bias")
        if bias is None and getattr(base, "bias", None) is not None:
            bias = base.bias.detach()
        for k in [k for k in sd if k.startswith(f"{name}.")]:
            del sd[k]
        sd[f"{name}.weight"] = w.to(dtype).contiguous()
        if bias is not None:
            sd[f"{name}.bias"] = bias
    return sd


def trainable_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]
