"""Registers `uhrbat` with transformers' Auto classes; `import uhrbat` runs it.

After a bare `import uhrbat`, `AutoConfig`, `AutoModel`, `AutoModelForImageTextToText`,
`AutoProcessor` and `AutoImageProcessor` load checkpoints saved by this package (model type
`uhrbat`) like any transformers VLM.
"""

from __future__ import annotations

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageTextToText,
    AutoProcessor,
)

from uhrbat.configuration import UhrBatConfig
from uhrbat.modeling.modeling_uhrbat import UhrBatForConditionalGeneration
from uhrbat.processing.image_processing_uhrbat import UhrBatImageProcessor
from uhrbat.processing.processing_uhrbat import UhrBatProcessor


def register_auto_classes() -> None:
    """Map model type `uhrbat` / `UhrBatConfig` to this package's classes (idempotent)."""
    AutoConfig.register(UhrBatConfig.model_type, UhrBatConfig, exist_ok=True)
    AutoModel.register(UhrBatConfig, UhrBatForConditionalGeneration, exist_ok=True)
    AutoModelForImageTextToText.register(UhrBatConfig, UhrBatForConditionalGeneration, exist_ok=True)
    # One implementation (numpy + Pillow) serves both backend names AutoImageProcessor may ask for.
    AutoImageProcessor.register(
        UhrBatConfig,
        image_processor_classes={"pil": UhrBatImageProcessor, "torchvision": UhrBatImageProcessor},
        exist_ok=True,
    )
    AutoProcessor.register(UhrBatConfig, UhrBatProcessor, exist_ok=True)
