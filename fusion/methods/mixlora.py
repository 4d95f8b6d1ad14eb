"""`mixlora`: MixLoRA (Li et al. 2024), a sparse mixture of LoRA experts inside the frozen FFN.

A router per decoder layer sends each token to its top-k LoRA experts, which add their deltas to
the frozen gate/up/down projections; attention projections carry plain, unrouted LoRAs. The routed
FFN lives in `mixlora_ffn`, checkpoints (reading, writing, validation) in `mixlora_checkpoint`,
training in `mixlora_training`.
"""

from __future__ import annotations

from ..adapters import ALL_MODULES
from ..errors import FusionError
from ..library import register_loader
from ..runtime import FusionPlan
from .base import BuildContext, FitResult, FusionMethod, Param
from .mixlora_checkpoint import MAX_EXPERTS, load_mixlora
from .mixlora_ffn import plan_from_adapter
from .mixlora_training import fit_mixlora


class MixLoraMethod(FusionMethod):
    name = "mixlora"
    pretty_name = "MixLoRA (LoRA experts)"
    kind = "dynamic"
    reference_url = "https://arxiv.org/abs/2404.15159"
    description = (
        "A router per layer sends each token to its top-k LoRA experts inside the frozen FFN; "
        "attention projections carry plain LoRAs. Fit trains a new MixLoRA adapter."
    )
    params = (
        Param(
            "top_k",
            "int",
            None,
            "Experts per token (default: the adapter's own top_k; 2 when training).",
            min=1,
            max=MAX_EXPERTS,
        ),
        Param("num_experts", "int", 8, "Training: experts per layer.", min=1, max=MAX_EXPERTS, fit_only=True),
        Param("r", "int", 8, "Training: LoRA rank of every expert and attention LoRA.", min=1, max=256, fit_only=True),
        Param("lora_alpha", "int", 16, "Training: LoRA alpha (scale = alpha / r).", min=1, max=4096, fit_only=True),
        Param(
            "lora_dropout",
            "float",
            0.05,
            "Training: dropout on LoRA inputs (the reference package refuses 0).",
            min=0.001,
            max=0.9,
            fit_only=True,
        ),
        Param(
            "target_modules",
            "text",
            ",".join(ALL_MODULES),
            "Training: comma-separated projections; attention ones get plain LoRAs, FFN ones experts.",
            fit_only=True,
        ),
        Param(
            "aux_loss_coef",
            "float",
            0.01,
            "Training: weight of the load-balance loss.",
            min=0.0,
            max=10.0,
            fit_only=True,
        ),
        Param(
            "router_init_range",
            "float",
            0.02,
            "Training: std of the router's normal init.",
            min=0.0,
            max=1.0,
            fit_only=True,
        ),
        Param(
            "lora_init",
            "choice",
            "original",
            "Training: LoRA A init, as in the reference package.",
            choices=("original", "gaussian"),
            fit_only=True,
        ),
        Param("seed", "int", 0, "Training: seed of the initial weights.", min=0, max=2**31 - 1, fit_only=True),
    )
    min_adapters = max_adapters = 1
    fittable = True
    fit_from_scratch = True
    adapter_kind = "mixlora"

    def build(self, ctx: BuildContext, adapters, params) -> FusionPlan:
        adapter = adapters[0]
        top_k = params.get("top_k") or adapter.top_k
        if top_k > adapter.num_experts:
            raise FusionError(
                f"parameter 'top_k' of method 'mixlora' is {top_k}, but adapter "
                f"{adapter.name!r} has only {adapter.num_experts} experts"
            )
        return plan_from_adapter(ctx, adapter, top_k, name=self.name)

    def fit(self, ctx, adapters, examples, params, options, on_progress=None, cancel=None) -> FitResult:
        return fit_mixlora(ctx, examples, params, options, on_progress, cancel)


register_loader("MIXLORA", load_mixlora)
