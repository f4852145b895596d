"""Supervised fine-tuning on Hugging Face `Trainer` (plain, DDP, DeepSpeed ZeRO-2/3 or FSDP).

`run_training(recipe)` loads the model and processor (`uhrbat.modeling.loading.load`), applies the
freeze policy (or LoRA), builds the dataset and collator, and trains with `UhrBatTrainer`, whose
saves are checkpoints in this package's format: `config.json` + `model*.safetensors` (LoRA folded
in) + the processor files, loadable by `load(dir)` / `uhrbat ask --model dir`. The resume state
(optimizer, scheduler, RNG, trainer state; DeepSpeed's `global_step*/`) sits beside them in each
`checkpoint-N/` folder; an interrupted run started again with the same recipe resumes from the
latest one.

Launch on one or many GPUs/nodes with the same command line:

    uhrbat train --config recipes/uhrbat-sft.yaml
    torchrun --nproc_per_node 8 -m uhrbat.cli.main train --config recipes/uhrbat-sft.yaml
    accelerate launch --num_processes 8 -m uhrbat.cli.main train --config recipes/uhrbat-sft.yaml
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from uhrbat.errors import CheckpointError, ConfigError
from uhrbat.training.collator import UhrBatCollator
from uhrbat.training.dataset import SftDataset
from uhrbat.training.freeze import (
    LoraSettings,
    apply_freeze,
    enable_gradient_checkpointing,
    has_lora,
    lora_state_dict,
    merged_state_dict,
    quantization_config,
    trainable_names,
)
from uhrbat.training.recipe import TrainRecipe
from uhrbat.training.reporting import report_to_list
from uhrbat.training.tokenize import TokenizeOptions

logger = logging.getLogger(__name__)

LORA_ADAPTER_FILE = "lora_adapter.safetensors"
LORA_CONFIG_FILE = "lora_config.json"
RECIPE_FILE = "train_recipe.json"


class UhrBatTrainer(Trainer):
    """`Trainer` that saves in this package's format and resumes from it.

    * `_save`: `model.save_pretrained` (safetensors) with LoRA adapters merged into the base
      weights, plus the processor, plus the adapters alone (for resuming a LoRA run) and the
      training arguments as JSON (no pickles beside the weights).
    * `_load_from_checkpoint`: reads those weights back; with LoRA, the frozen base layers keep
      the starting model's weights and the adapters come from `lora_adapter.safetensors`.
    * `training_step`: a non-finite loss zeroes the accumulated gradients (as the reference's
      trainer did) instead of poisoning the weights; every micro-step's loss is kept in
      `step_losses`.
    """

    def __init__(
        self,
        *args: Any,
        processor: Any = None,
        recipe: TrainRecipe | None = None,
        skip_nonfinite_loss: bool = True,
        max_shard_size: str = "5GB",
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.processor = processor
        self.recipe = recipe
        self.skip_nonfinite_loss = skip_nonfinite_loss
        self.max_shard_size = max_shard_size
        self.step_losses: list[float] = []
        self.skipped_steps = 0

    # ------------------------------------------------------------------ step
    def training_step(
        self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        value = float(loss)
        if self.skip_nonfinite_loss and not math.isfinite(value):
            self.skipped_steps += 1
            if self.is_deepspeed_enabled:
                logger.warning(
                    "non-finite loss at step %d (DeepSpeed: gradients cannot be dropped here)", self.state.global_step
                )
            else:
                logger.warning(
                    "non-finite loss at step %d: gradients of this accumulation window dropped", self.state.global_step
                )
                model.zero_grad(set_to_none=True)
            loss = torch.zeros_like(loss)
            value = 0.0
        self.step_losses.append(value)
        return loss

    # ------------------------------------------------------------------ save / load
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        sd = merged_state_dict(model, state_dict)
        text_cfg = model.config.text_config
        use_cache = getattr(text_cfg, "use_cache", True)
        text_cfg.use_cache = True  # the saved checkpoint is for inference
        try:
            model.save_pretrained(
                output_dir, state_dict=sd, max_shard_size=self.max_shard_size, is_main_process=self.args.should_save
            )
        finally:
            text_cfg.use_cache = use_cache
        if self.processor is not None:
            self.processor.save_pretrained(output_dir)
        if has_lora(model):
            from safetensors.torch import save_file

            adapters = (
                {k: v.detach().cpu().contiguous() for k, v in state_dict.items() if "lora_" in k}
                if state_dict is not None
                else lora_state_dict(model)
            )  # gathered under ZeRO-3 / FSDP
            save_file(adapters, os.path.join(output_dir, LORA_ADAPTER_FILE), metadata={"format": "pt"})
            if self.recipe is not None:
                Path(output_dir, LORA_CONFIG_FILE).write_text(json.dumps(self.recipe.lora.__dict__, indent=2) + "\n")
        Path(output_dir, "training_args.json").write_text(self.args.to_json_string())
        if self.recipe is not None:
            Path(output_dir, RECIPE_FILE).write_text(json.dumps(self.recipe.to_dict(), indent=2, default=str) + "\n")

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        model = model if model is not None else self.model
        if self.is_fsdp_enabled:
            # Our checkpoints hold the full (gathered) weights as safetensors: every rank reads them
            # and keeps its own shard.
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            sd = checkpoint_state_for(self.accelerator.unwrap_model(model), resume_from_checkpoint)
            set_model_state_dict(model, sd, options=StateDictOptions(full_state_dict=True, strict=False))
            return
        load_checkpoint_weights(self.accelerator.unwrap_model(model), resume_from_checkpoint)


def read_safetensors_dir(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a (possibly sharded) `model*.safetensors` checkpoint."""
    from safetensors.torch import load_file

    d = Path(directory)
    index = d / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (d / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise CheckpointError(f"{d}: no model.safetensors in the checkpoint")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(load_file(str(d / f), device="cpu"))
    return sd


def checkpoint_state_for(model: torch.nn.Module, directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict to resume `model` from a checkpoint saved by `UhrBatTrainer._save`."""
    sd, _ = _checkpoint_state(model, directory)
    return sd


def _checkpoint_state(model: torch.nn.Module, directory: str | os.PathLike) -> tuple[dict[str, torch.Tensor], set[str]]:
    sd = read_safetensors_dir(directory)
    allowed_missing: set[str] = set()
    if has_lora(model):
        from peft.tuners.lora import LoraLayer
        from safetensors.torch import load_file

        adapter = Path(directory) / LORA_ADAPTER_FILE
        if not adapter.exists():
            raise CheckpointError(f"{directory}: {LORA_ADAPTER_FILE} missing; cannot resume a LoRA run from it")
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer):
                # Merged weights would count the adapters twice: keep the starting base weights.
                for k in (f"{name}.weight", f"{name}.bias"):
                    sd.pop(k, None)
                allowed_missing.update(k for k in model.state_dict() if k.startswith(f"{name}.base_layer."))
        sd.update(load_file(str(adapter), device="cpu"))
    return sd, allowed_missing


def load_checkpoint_weights(model: torch.nn.Module, directory: str | os.PathLike) -> None:
    """Load a checkpoint saved by `UhrBatTrainer._save` into `model` (strict, LoRA-aware)."""
    sd, allowed_missing = _checkpoint_state(model, directory)
    own = model.state_dict()
    sd = {k: v.to(own[k].dtype) if k in own and own[k].dtype != v.dtype else v for k, v in sd.items()}
    result = model.load_state_dict(sd, strict=False)
    missing = [k for k in result.missing_keys if k not in allowed_missing]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"{directory}: checkpoint does not match the model "
            f"(missing {missing[:4]}, unexpected {result.unexpected_keys[:4]})"
        )


# ----------------------------------------------------------------------------- building blocks
def _dtype_for(recipe: TrainRecipe) -> str:
    if recipe.dtype:
        return recipe.dtype
    if recipe.deepspeed and recipe.bf16:
        return "bf16"  # DeepSpeed keeps fp32 master weights in the optimizer
    if recipe.deepspeed and recipe.fp16:
        return "fp16"
    return "fp32"


def load_model_for_training(recipe: TrainRecipe, device: str | None = None):
    """(model, processor) with the freeze policy / LoRA applied."""
    from uhrbat.modeling.loading import load, resolve_dtype

    dtype = _dtype_for(recipe)
    extra: dict[str, Any] = {}
    qcfg = quantization_config(recipe.lora, resolve_dtype(dtype, "cpu"))
    if qcfg is not None:
        extra["quantization_config"] = qcfg
    model, processor = load(
        recipe.model, device=device or "cpu", dtype=dtype, attn_implementation=recipe.attn_implementation, **extra
    )
    counts = apply_freeze(model, recipe.train, recipe.lora)
    logger.info("trainable parameters: %s", counts)
    if recipe.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model.config.text_config.use_cache = False
    model.train()
    return model, processor


def selection_kwargs(recipe: TrainRecipe) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if recipe.selector:
        out["selector"] = recipe.selector
    if recipe.kmeans_clusters is not None:
        out["kmeans_clusters"] = int(recipe.kmeans_clusters)
    if recipe.kmeans_iters is not None:
        out["kmeans_iters"] = int(recipe.kmeans_iters)
    if recipe.kmeans_mode:
        out["kmeans_mode"] = recipe.kmeans_mode
    if recipe.selection_seed is not None:
        out["seed"] = int(recipe.selection_seed)
    return out


def training_arguments(recipe: TrainRecipe, resume: bool = False) -> TrainingArguments:
    kw: dict[str, Any] = dict(
        output_dir=recipe.output_dir,
        num_train_epochs=recipe.num_train_epochs,
        max_steps=recipe.max_steps,
        per_device_train_batch_size=recipe.per_device_train_batch_size,
        per_device_eval_batch_size=recipe.per_device_train_batch_size,
        gradient_accumulation_steps=recipe.gradient_accumulation_steps,
        learning_rate=recipe.learning_rate,
        weight_decay=recipe.weight_decay,
        warmup_steps=recipe.warmup_ratio,  # < 1: a ratio of the total steps
        lr_scheduler_type=recipe.lr_scheduler_type,
        max_grad_norm=recipe.max_grad_norm,
        bf16=recipe.bf16,
        fp16=recipe.fp16,
        logging_steps=recipe.logging_steps,
        save_strategy="steps",
        save_steps=recipe.save_steps,
        save_total_limit=recipe.save_total_limit,
        dataloader_num_workers=recipe.dataloader_num_workers,
        dataloader_drop_last=recipe.dataloader_drop_last,
        dataloader_pin_memory=torch.cuda.is_available(),
        report_to=report_to_list(recipe.report_to),
        seed=recipe.seed,
        remove_unused_columns=False,
        deepspeed=recipe.deepspeed_config(),
    )
    if recipe.tf32 is not None and torch.cuda.is_available():
        kw["tf32"] = recipe.tf32
    if not torch.cuda.is_available() and not recipe.deepspeed:
        kw["use_cpu"] = True  # CPU runs (bf16 autocast works there too)
    if recipe.fsdp:
        kw["fsdp"] = True
        kw["fsdp_config"] = recipe.fsdp_settings()
    kw.update(recipe.trainer_args)
    return TrainingArguments(**kw)


@dataclass
class TrainResult:
    output_dir: str
    global_step: int
    step_losses: list[float]
    log_history: list[dict[str, Any]]
    resumed_from: str | None
    dropped: int
    trainable: list[str] = field(default_factory=list)
    engine: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def engine_info(trainer: Trainer) -> dict[str, Any]:
    """What actually ran: DeepSpeed stage and offload, FSDP, world size, device, dtype."""
    info: dict[str, Any] = {"world_size": trainer.args.world_size, "device": str(trainer.args.device)}
    model = trainer.accelerator.unwrap_model(trainer.model)
    info["dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
    if trainer.is_deepspeed_enabled:
        eng = trainer.model_wrapped
        zero = eng.config.get("zero_optimization", {}) if isinstance(getattr(eng, "config", None), dict) else {}
        info["engine"] = "deepspeed"
        info["zero_stage"] = int(eng.zero_optimization_stage())
        info["offload_optimizer"] = (zero.get("offload_optimizer") or {}).get("device", "none")
        info["offload_param"] = (zero.get("offload_param") or {}).get("device", "none")
        info["optimizer"] = type(getattr(eng, "basic_optimizer", None) or eng.optimizer).__name__
    elif trainer.is_fsdp_enabled:
        info["engine"] = "fsdp"
        info["fsdp_version"] = int(trainer.args.fsdp_config.get("version", 2))
    else:
        info["engine"] = "ddp" if trainer.args.world_size > 1 else "single"
    return info


def build_trainer(
    recipe: TrainRecipe, callbacks: list[Any] | None = None, model: Any = None, processor: Any = None
) -> UhrBatTrainer:
    """Model + data + `UhrBatTrainer` for a recipe (no training yet)."""
    if model is None:
        model, processor = load_model_for_training(recipe)
    options = TokenizeOptions.from_compat(recipe.compat, layout=recipe.layout, labels=recipe.labels, query=recipe.query)
    max_length = recipe.max_length or model.config.max_context
    train_ds = SftDataset(recipe.data, processor, recipe.budgets, max_length, options, use_masks=recipe.use_masks)
    eval_ds = (
        SftDataset(recipe.eval_data, processor, recipe.budgets, max_length, options, use_masks=recipe.use_masks)
        if recipe.eval_data
        else None
    )
    collator = UhrBatCollator(
        pad_token_id=processor.tokenizer.pad_token_id,
        budgets=recipe.budgets,
        padding_side=recipe.padding_side,
        selection=selection_kwargs(recipe),
    )
    args = training_arguments(recipe)
    trainer = UhrBatTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=collator,
        callbacks=callbacks,
        processor=processor,
        recipe=recipe,
        skip_nonfinite_loss=recipe.skip_nonfinite_loss,
        max_shard_size=recipe.max_shard_size,
    )
    return trainer


def find_resume_checkpoint(recipe: TrainRecipe) -> str | None:
    if recipe.resume == "never":
        return None
    if recipe.resume != "auto":
        return recipe.resume
    if not Path(recipe.output_dir).is_dir():
        return None
    return get_last_checkpoint(recipe.output_dir)


def run_training(recipe: TrainRecipe, callbacks: list[Any] | None = None) -> TrainResult:
    """Train per the recipe (resuming from the latest checkpoint when there is one) and save."""
    recipe.check()
    problems = recipe.machine_problems()
    if problems:
        raise ConfigError(problems[0])
    trainer = build_trainer(recipe, callbacks=callbacks)
    resume = find_resume_checkpoint(recipe)
    if resume:
        logger.info("resuming from %s", resume)
    dropped = len(trainer.train_dataset.dropped)
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(recipe.output_dir)
    if trainer.args.should_save:
        _write_dropped(trainer.train_dataset, Path(recipe.output_dir))
    return TrainResult(
        output_dir=recipe.output_dir,
        global_step=trainer.state.global_step,
        step_losses=list(trainer.step_losses),
        log_history=list(trainer.state.log_history),
        resumed_from=resume,
        dropped=dropped,
        trainable=trainable_names(trainer.accelerator.unwrap_model(trainer.model)),
        engine=engine_info(trainer),
    )


def _write_dropped(ds: SftDataset, out: Path) -> None:
    if not ds.dropped:
        return
    with (out / "dropped_samples.jsonl").open("w") as f:
        for d in ds.dropped:
            f.write(json.dumps({"id": d.id, "reason": d.reason}) + "\n")


__all__ = [
    "LoraSettings",
    "TrainRecipe",
    "UhrBatTrainer",
    "build_trainer",
    "load_checkpoint_weights",
    "run_training",
    "training_arguments",
    "ConfigError",
]
