"""`linear`: the exact weighted sum of LoRA deltas, sum_i w_i s_i B_i A_i.

Held as one stacked low-rank delta of rank sum(r_i), so it is exact (no cross terms, unlike
peft's `linear`, which is offered separately as `peft_linear`).
"""

import torch

from ..runtime import FusionPlan
from .base import BuildContext, FusionMethod, module_keys, resolve_weights, slot_weights_param, stacked_delta


class LinearMethod(FusionMethod):
    name = "linear"
    pretty_name = "Linear (weighted sum of deltas)"
    kind = "static"
    reference_url = "https://arxiv.org/abs/2212.04089"
    description = "Exact weighted sum of the LoRAs' deltas; default weights 1/k (averaging)."
    params = (slot_weights_param("One weight per adapter, comma-separated; default 1/k each."),)
    min_adapters = 1

    def build(self, ctx: BuildContext, adapters, params) -> FusionPlan:
        weights = resolve_weights(params.get("weights"), len(adapters), None, self.name)
        deltas = {key: stacked_delta(ctx, adapters, key, weights, dynamic=False) for key in module_keys(adapters)}
        static = torch.tensor(weights, dtype=torch.float32).expand(ctx.num_layers, -1).clone()
        return FusionPlan(method=self.name, slot_names=[a.name for a in adapters], deltas=deltas, static_weights=static)
