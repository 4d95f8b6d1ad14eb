"""LoRA composition studio engine: load a base model and LoRAs, fuse them, generate, trace."""

from .errors import FusionError

__all__ = ["FusionError"]
