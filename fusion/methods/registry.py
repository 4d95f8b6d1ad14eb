"""All fusion methods by name. Adding a method: one module, one line here, one test row."""

from ..errors import FusionError
from .base import FusionMethod
from .base_model import BaseModelMethod
from .cat import CatMethod
from .linear import LinearMethod
from .lora_flow import LoraFlowMethod
from .lorahub import LoraHubMethod
from .mixlora import MixLoraMethod
from .single import SingleMethod
from .task_arithmetic import VARIANTS as TASK_ARITHMETIC_VARIANTS

_METHODS: list[FusionMethod] = [
    BaseModelMethod(),
    SingleMethod(),
    LinearMethod(),
    *TASK_ARITHMETIC_VARIANTS,
    LoraHubMethod(),
    CatMethod(),
    LoraFlowMethod(),
    MixLoraMethod(),
]
METHODS: dict[str, FusionMethod] = {m.name: m for m in _METHODS}


def get_method(name: str) -> FusionMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise FusionError(f"unknown fusion method {name!r}; choose one of {', '.join(METHODS)}") from None
