"""`base`: the base model alone, no adapter. The reference every ratio is measured against."""

from ..runtime import FusionPlan
from .base import BuildContext, FusionMethod


class BaseModelMethod(FusionMethod):
    name = "base"
    pretty_name = "Base model"
    kind = "static"
    description = "The base model without any adapter."
    min_adapters = 0
    max_adapters = None  # adapters, if given, are ignored so comparisons can keep their choice

    def validate(self, adapters, params):
        if params:
            return super().validate([], params)
        return {}

    def build(self, ctx: BuildContext, adapters, params) -> FusionPlan:
        return FusionPlan(method=self.name, slot_names=[])
