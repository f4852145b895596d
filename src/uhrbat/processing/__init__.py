from uhrbat.processing.image_processing_uhrbat import UhrBatImageProcessor
from uhrbat.processing.processing_uhrbat import UhrBatProcessor, parse_budgets

__all__ = ["UhrBatImageProcessor", "UhrBatProcessor", "parse_budgets"]
