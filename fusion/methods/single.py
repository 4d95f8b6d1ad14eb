"""`single`: one LoRA applied as trained, delta = s * B A x."""

import torch

from ..runtime import FusionPlan
from .base import BuildContext, FusionMethod, module_keys, stacked_delta


class SingleMethod(FusionMethod):
    name = "single"
    pretty_name = "Single LoRA"
    kind = "static"
    reference_url = "https://arxiv.org/abs/2106.09685"
    description = "One LoRA on its own (the first adapter chosen)."
    min_adapters = 1
    max_adapters = 1

    def build(self, ctx: BuildContext, adapters, params) -> FusionPlan:
        deltas = {key: stacked_delta(ctx, adapters, key, None, dynamic=False) for key in module_keys(adapters)}
        return FusionPlan(
            method=self.name, slot_names=[adapters[0].name], deltas=deltas, static_weights=torch.ones(ctx.num_layers, 1)
        )
