"""Fusion methods, one module each, collected in `registry`."""

from .base import BuildContext, FitResult, FusionMethod, Param
from .registry import METHODS, get_method

__all__ = ["BuildContext", "FitResult", "FusionMethod", "Param", "METHODS", "get_method"]
