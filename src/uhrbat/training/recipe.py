"""Training recipes: a YAML file (e.g. `recipes/uhrbat-sft.yaml`) plus command-line overrides.

Every field of `TrainRecipe` may appear in the YAML; `trainer_args` passes anything else straight
to `transformers.TrainingArguments`. Overrides use dotted keys with YAML values:
`--set learning_rate=1e-5 --set lora.r=16 --set budgets=[40,160,300,1000]`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uhrbat.errors import ConfigError
from uhrbat.training.freeze import LoraSettings, parse_parts

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEEPSPEED_CONFIGS = {
    "zero2": "zero2.json",
    "zero2_offload": "zero2_offload.json",
    "zero3": "zero3.json",
    "zero3_offload": "zero3_offload.json",
}
FSDP_CONFIGS = {"fsdp": "fsdp.json", "fsdp_offload": "fsdp_offload.json"}


@dataclass
class TrainRecipe:
    """Everything `uhrbat train` needs. Defaults are the released recipe (method §5.1)."""

    # what to train
    model: str = ""
    data: str = ""
    eval_data: str | None = None
    output_dir: str = "runs/uhrbat-sft"
    train: str = "vision_projector,token_mlp,llm"
    lora: LoraSettings = field(default_factory=LoraSettings)
    # selection during training
    budgets: list[int] = field(default_factory=lambda: [80, 320, 600, 2000])
    selector: str | None = "kmeans"
    kmeans_clusters: int | None = 3000
    kmeans_iters: int | None = 10
    kmeans_mode: str | None = None
    selection_seed: int | None = 0
    use_masks: bool = True
    # tokenisation
    max_length: int | None = 5000
    compat: str = "none"
    layout: str | None = None
    labels: str | None = None
    query: str | None = None
    padding_side: str = "right"
    # precision / memory
    dtype: str | None = None  # load dtype; default: bf16 under DeepSpeed+bf16, else fp32
    bf16: bool = True
    fp16: bool = False
    tf32: bool | None = True
    attn_implementation: str | None = "sdpa"
    gradient_checkpointing: bool = True
    # engine
    deepspeed: str | None = "zero2_offload"
    deepspeed_overrides: dict[str, Any] = field(default_factory=dict)  # merged into the DeepSpeed JSON
    fsdp: bool | str | None = None  # true, or legacy "full_shard auto_wrap" / "shard_grad_op offload"
    fsdp_config: str | None = None  # shipped name (fsdp, fsdp_offload) or a JSON path; default fsdp
    # optimisation
    num_train_epochs: float = 1.0
    max_steps: int = -1
    per_device_train_batch_size: int = 1
    gradient_accumulation_steps: int = 2
    learning_rate: float = 2e-6
    weight_decay: float = 0.0
    warmup_ratio: float = 0.2
    lr_scheduler_type: str = "cosine"
    max_grad_norm: float = 0.5
    skip_nonfinite_loss: bool = True
    # bookkeeping
    logging_steps: int = 1
    save_steps: int = 100
    save_total_limit: int | None = 3
    dataloader_num_workers: int = 0
    dataloader_drop_last: bool = True
    report_to: str | list[str] = "tensorboard"
    seed: int = 42
    resume: str = "auto"  # auto | never | a checkpoint folder
    max_shard_size: str = "5GB"
    trainer_args: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ checks
    def check(self) -> None:
        if not self.model:
            raise ConfigError(
                "recipe: 'model' is required (a checkpoint folder in this package's format; see `uhrbat convert`)"
            )
        if not self.data:
            raise ConfigError("recipe: 'data' is required (a manifest from `uhrbat data prepare-sft`)")
        parse_parts(self.train)
        self.lora.check()
        if self.deepspeed and self.fsdp:
            raise ConfigError("recipe: choose deepspeed or fsdp, not both")
        if self.bf16 and self.fp16:
            raise ConfigError("recipe: bf16 and fp16 are exclusive")
        if self.padding_side not in ("left", "right"):
            raise ConfigError(f"recipe: padding_side must be left or right, got {self.padding_side!r}")
        if self.compat not in ("none", "reference"):
            raise ConfigError(f"recipe: compat must be none or reference, got {self.compat!r}")
        if self.per_device_train_batch_size < 1 or self.gradient_accumulation_steps < 1:
            raise ConfigError("recipe: batch size and gradient accumulation must be >= 1")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"recipe: warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.resume not in ("auto", "never") and not Path(self.resume).is_dir():
            raise ConfigError(f"recipe: resume must be auto, never or a checkpoint folder; {self.resume} not found")

    def machine_problems(self) -> list[str]:
        """What in this recipe cannot run on this machine, one line each (empty: all can).

        `uhrbat train --dry-run` prints them; a real run stops with the first one before loading
        anything (instead of e.g. DeepSpeed's `No module named 'mpi4py'` minutes later).
        """
        from uhrbat.devices import cuda_unavailable_reason
        from uhrbat.training.reporting import report_to_problems

        problems = report_to_problems(self.report_to)
        why = cuda_unavailable_reason()
        if why is None:
            return problems
        launched = "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ
        if self.deepspeed and not launched:
            # Under a launcher (torchrun sets LOCAL_RANK/WORLD_SIZE) DeepSpeed can run on CPU
            # with gloo, which the engine tests use; a plain run looks for MPI and GPUs.
            problems.append(
                f"deepspeed {self.deepspeed}: DeepSpeed needs CUDA, which is not available on this "
                f"machine ({why}); use --deepspeed none"
            )
        if self.fp16:
            problems.append(f"fp16: fp16 mixed precision needs CUDA ({why}); use --set fp16=false (bf16 runs on CPU)")
        if self.lora.quantize not in (None, "none"):
            problems.append(
                f"lora.quantize {self.lora.quantize}: QLoRA (bitsandbytes) needs CUDA ({why}); drop --qlora"
            )
        return problems

    # ------------------------------------------------------------------ engine configs
    def deepspeed_path(self) -> str | None:
        return resolve_engine_config(self.deepspeed, DEEPSPEED_CONFIGS)

    def deepspeed_config(self) -> str | dict[str, Any] | None:
        """The DeepSpeed config for `TrainingArguments.deepspeed`: the file, or a dict with
        `deepspeed_overrides` deep-merged into it."""
        path = self.deepspeed_path()
        if path is None or not self.deepspeed_overrides:
            return path
        import json

        return deep_merge(json.loads(Path(path).read_text()), self.deepspeed_overrides)

    def fsdp_config_path(self) -> str | None:
        if not self.fsdp:
            return None
        return resolve_engine_config(self.fsdp_config or "fsdp", FSDP_CONFIGS)

    def fsdp_settings(self) -> dict[str, Any] | None:
        """The FSDP config dict for `TrainingArguments.fsdp_config` (legacy option words folded in)."""
        if not self.fsdp:
            return None
        import json

        cfg = json.loads(Path(self.fsdp_config_path()).read_text())
        if isinstance(self.fsdp, str):
            for word in self.fsdp.split():
                if word == "full_shard":
                    cfg["reshard_after_forward"] = True
                elif word == "shard_grad_op":
                    cfg["reshard_after_forward"] = False
                elif word == "offload":
                    cfg["cpu_offload"] = True
                elif word != "auto_wrap":
                    raise ConfigError(
                        f"recipe: unknown fsdp option {word!r} (full_shard, shard_grad_op, offload, auto_wrap)"
                    )
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def resolve_engine_config(name: str | None, shipped: dict[str, str]) -> str | None:
    """A shipped config name (`zero2_offload`) or a path -> an existing file path."""
    if not name or str(name).lower() in ("none", "null", "false"):
        return None
    if name in shipped:
        return str(CONFIG_DIR / shipped[name])
    p = Path(name)
    if p.is_file():
        return str(p)
    if (CONFIG_DIR / name).is_file():
        return str(CONFIG_DIR / name)
    raise ConfigError(f"engine config {name!r} is neither a shipped config ({', '.join(shipped)}) nor a file")


def _yaml():
    try:
        import yaml
    except ImportError as e:  # pragma: no cover - pyyaml ships with transformers
        raise ConfigError("recipes need pyyaml (pip install pyyaml)") from e
    return yaml


def parse_override(item: str) -> tuple[list[str], Any]:
    """`"lora.r=16"` -> (["lora", "r"], 16) (the value is parsed as YAML)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value")
    key, value = item.split("=", 1)
    key = key.strip().lstrip("-").replace("-", "_")
    if not key:
        raise ConfigError(f"override {item!r} has an empty key")
    return key.split("."), _yaml().safe_load(value) if value.strip() else None


def _apply(d: dict[str, Any], path: Sequence[str], value: Any) -> None:
    cur = d
    for k in path[:-1]:
        cur = cur.setdefault(k, {})
        if not isinstance(cur, dict):
            raise ConfigError(f"override {'.'.join(path)}: {k} is not a mapping")
    cur[path[-1]] = value


def build_recipe(data: dict[str, Any]) -> TrainRecipe:
    """A plain mapping (parsed YAML + overrides) -> a checked `TrainRecipe`."""
    data = dict(data)
    names = {f.name for f in dataclasses.fields(TrainRecipe)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"recipe: unknown keys {unknown}; put extra TrainingArguments under trainer_args")
    lora = data.pop("lora", None) or {}
    if isinstance(lora, int):
        lora = {"r": lora}
    if not isinstance(lora, dict):
        raise ConfigError("recipe: lora must be a mapping (r, alpha, dropout, target_modules, quantize)")
    lora_names = {f.name for f in dataclasses.fields(LoraSettings)}
    if set(lora) - lora_names:
        raise ConfigError(f"recipe: unknown lora keys {sorted(set(lora) - lora_names)}")
    if data.get("budgets") is not None:  # the one budget parser (same rule as the CLI and the API)
        from uhrbat.processing.processing_uhrbat import parse_budgets

        data["budgets"] = parse_budgets(data["budgets"])
    if isinstance(data.get("train"), (list, tuple)):
        data["train"] = ",".join(data["train"])
    if str(data.get("fsdp", "")).strip().lower() in ("true", "yes", "on", "1"):
        data["fsdp"] = True
    for key in ("deepspeed", "fsdp", "fsdp_config", "eval_data", "dtype"):
        if isinstance(data.get(key), (str, bool)) and str(data[key]).strip().lower() in (
            "none",
            "null",
            "false",
            "",
            "no",
        ):
            data[key] = None
    recipe = TrainRecipe(**data, lora=LoraSettings(**lora))
    for key in ("learning_rate", "weight_decay", "warmup_ratio", "max_grad_norm", "num_train_epochs"):
        setattr(recipe, key, float(getattr(recipe, key)))  # YAML reads "2e-6" as a string
    recipe.check()
    return recipe


def load_recipe(path: str | os.PathLike | None, overrides: Sequence[str] = (), **named: Any) -> TrainRecipe:
    """Read a YAML recipe, apply `key=value` overrides, then the non-None `named` values."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"recipe not found: {p}")
        loaded = _yaml().safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: a recipe must be a YAML mapping")
        data.update(loaded)
    for item in overrides:
        key, value = parse_override(item)
        _apply(data, key, value)
    for k, v in named.items():
        if v is not None:
            _apply(data, k.split("."), v)
    return build_recipe(data)
