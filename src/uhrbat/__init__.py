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
    "ImageLoadError",
    "PromptError",
    "UhrBatConfig",
    "UhrBatError",
    "UhrBatForConditionalGeneration",
    "UhrBatImageProcessor",
    "UhrBatPipeline",
    "UhrBatProcessor",
]

register_auto_classes()


def __getattr__(name: str):
    # Lazy: the pipeline pulls in the image readers and generation plumbing only when used.
    if name == "UhrBatPipeline":
        from uhrbat.pipeline import UhrBatPipeline

        return UhrBatPipeline
    raise AttributeError(name)
