from uhrbat.configuration.configuration_uhrbat import UhrBatConfig, is_reference_checkpoint, is_reference_config
from uhrbat.configuration.geometry import CLIP_336_14, TokenGeometry

__all__ = ["CLIP_336_14", "TokenGeometry", "UhrBatConfig", "is_reference_checkpoint", "is_reference_config"]
