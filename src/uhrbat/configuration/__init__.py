from uhrbat.configuration.configuration_uhrbat import UhrBatConfig, is_reference_config

__all__ = ["UhrBatConfig", "is_reference_config"]
