"""UHR-BAT: budget-aware token compression VLM for ultra-high-resolution remote sensing.

Importing the package registers `uhrbat` with transformers' Auto classes (`AutoConfig`,
`AutoModel`, `AutoModelForImageTextToText`, `AutoProcessor`, `AutoImageProcessor`; see
`uhrbat.auto`).
"""

from uhrbat.auto import register_auto_classes
from uhrbat.configuration import UhrBatConfig
from uhrbat.errors import (
    BudgetError,
    CheckpointError,
    ConfigError,
    ContextOverflowError,
    ImageLoadError,
    PromptError,
    UhrBatError,
)
from uhrbat.modeling.modeling_uhrbat import UhrBatForConditionalGeneration
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
]

register_auto_classes()


_LAZY = {
    "UhrBatPipeline": "uhrbat.pipeline",
    "SceneStore": "uhrbat.scene.store",
    "SelectionOptions": "uhrbat.options",
    "GenerationOptions": "uhrbat.options",
    "ReadOptions": "uhrbat.options",
}


def __getattr__(name: str):
    # Lazy: the pipeline pulls in the image readers and generation plumbing only when used.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(name)
