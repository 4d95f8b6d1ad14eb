"""Fusion methods, one module each, collected in `registry`."""

from .base import BuildContext, FusionMethod, Param
from .registry import METHODS, get_method, register

__all__ = ["BuildContext", "FusionMethod", "Param", "METHODS", "get_method", "register"]
