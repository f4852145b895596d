"""UHR-BAT: budget-aware token compression VLM for ultra-high-resolution remote sensing.

Importing the package registers `uhrbat` with transformers' Auto classes.
"""

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

__version__ = "0.1.0"

__all__ = [
    "BudgetError",
    "CheckpointError",
    "ConfigError",
    "ContextOverflowError",
    "ImageLoadError",
    "PromptError",
    "UhrBatConfig",
    "UhrBatError",
    "UhrBatForConditionalGeneration",
    "UhrBatImageProcessor",
    "UhrBatPipeline",
    "UhrBatProcessor",
]


def __getattr__(name: str):
    # Lazy: keep `import uhrbat` (and the CLI's start-up) light.
    if name == "UhrBatForConditionalGeneration":
        from uhrbat.modeling.modeling_uhrbat import UhrBatForConditionalGeneration

        return UhrBatForConditionalGeneration
    if name == "UhrBatProcessor":
        from uhrbat.processing.processing_uhrbat import UhrBatProcessor

        return UhrBatProcessor
    if name == "UhrBatImageProcessor":
        from uhrbat.processing.image_processing_uhrbat import UhrBatImageProcessor

        return UhrBatImageProcessor
    if name == "UhrBatPipeline":
        from uhrbat.pipeline import UhrBatPipeline

        return UhrBatPipeline
    raise AttributeError(name)
