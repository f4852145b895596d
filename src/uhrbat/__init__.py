"""UHR-BAT: budget-aware token compression VLM for ultra-high-resolution remote sensing.

Importing the package registers `uhrbat` with transformers' Auto classes (`AutoConfig`,
`AutoModel`, `AutoModelForImageTextToText`, `AutoProcessor`, `AutoImageProcessor`; see
`uhrbat.auto`). The classes below are imported on first use. Only the `uhrbat` command defers
the registration (see `_uhrbat_launcher`): its `--help` and usage errors must not import torch
and transformers; it registers when it loads a model.
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Any

from uhrbat.devices import quiet_deepspeed_cpu_notice
from uhrbat.errors import (
    BudgetError,
    CheckpointError,
    ConfigError,
    ContextOverflowError,
    ImageLoadError,
    PromptError,
    UhrBatError,
)

if TYPE_CHECKING:
    from uhrbat.auto import register_auto_classes
    from uhrbat.configuration import UhrBatConfig
    from uhrbat.modeling.modeling_uhrbat import UhrBatForConditionalGeneration
    from uhrbat.pipeline import UhrBatPipeline
    from uhrbat.processing.image_processing_uhrbat import UhrBatImageProcessor
    from uhrbat.processing.processing_uhrbat import UhrBatProcessor

__version__ = "0.1.0"

__all__ = [
    "BudgetError",
    "CheckpointError",
    "ConfigError",
    "ContextOverflowError",
    "GenerationOptions",
    "ImageLoadError",
    "PromptError",
    "ReadOptions",
    "SceneStore",
    "SelectionOptions",
    "UhrBatConfig",
    "UhrBatError",
    "UhrBatForConditionalGeneration",
    "UhrBatImageProcessor",
    "UhrBatPipeline",
    "UhrBatProcessor",
    "register_auto_classes",
]

# Public name -> the module that defines it, imported on first access.
_LAZY = {
    "UhrBatConfig": "uhrbat.configuration",
    "UhrBatForConditionalGeneration": "uhrbat.modeling.modeling_uhrbat",
    "UhrBatImageProcessor": "uhrbat.processing.image_processing_uhrbat",
    "UhrBatProcessor": "uhrbat.processing.processing_uhrbat",
    "UhrBatPipeline": "uhrbat.pipeline",
    "register_auto_classes": "uhrbat.auto",
    "SceneStore": "uhrbat.scene.store",
    "SelectionOptions": "uhrbat.options",
    "GenerationOptions": "uhrbat.options",
    "ReadOptions": "uhrbat.options",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'uhrbat' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


# DeepSpeed (imported by accelerate and the Trainer when installed) warns "Setting accelerator
# to CPU" on every CPU-only run; the filter drops that one record where CUDA is really absent.
quiet_deepspeed_cpu_notice()

if not getattr(sys.modules.get("_uhrbat_launcher"), "DEFER_AUTO_REGISTRATION", False):
    from uhrbat.auto import register_auto_classes

    register_auto_classes()
