"""Training a new MixLoRA adapter from examples: the `mixlora` method's fit.

Initialisation follows the reference implementation: every LoRA A kaiming-uniform(a=sqrt(5))
(or N(0, 1/r) with lora_init "gaussian"), every B zero, routers N(0, router_init_range). With
B = 0 every expert equals the frozen FFN, so training starts exactly at the base model.
The loss is the answer cross-entropy plus the Mixtral load-balance loss
    coef * E * sum_{j<k, e} f_{j,e} P_e
over the router logits of all layers concatenated, padding masked, where f_{j,e} is the
fraction of tokens whose j-th choice is expert e and P_e the mean router probability of e.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from ..adapters import ALL_MODULES, LoraFactors
from ..errors import FusionError
from ..runtime import Run, current_run
from ..training import TrainConfig, train
from .base import BuildContext, FitResult
from .mixlora_checkpoint import ExpertFactors, MixLoraAdapter, MixLoraConfig, linear_shape, save_mixlora
from .mixlora_ffn import plan_from_adapter

# Overridable through the fit's training options.
TRAIN_DEFAULTS = {
    "lr": 3e-4,
    "epochs": 2,
    "batch_size": 4,
    "weight_decay": 0.0,
    "warmup_ratio": 0.05,
    "betas": (0.9, 0.999),
}


def load_balancing_loss(
    router_logits: list[torch.Tensor], num_experts: int, top_k: int, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mixtral's auxiliary loss (without the coefficient) over every layer's logits (B*T, E)."""
    logits = torch.cat(router_logits, dim=0).float()  # (L*B*T, E)
    probs = torch.softmax(logits, dim=-1)
    _, chosen = probs.topk(top_k, dim=-1)  # (L*B*T, k)
    assigned = F.one_hot(chosen, num_experts).float()  # (L*B*T, k, E)
    if attention_mask is None:
        weight = torch.ones(logits.shape[0], device=logits.device)
    else:  # each layer's rows follow the (B, T) order of the mask
        weight = attention_mask.reshape(-1).to(logits.device, torch.float32).repeat(len(router_logits))
    total = weight.sum().clamp_min(1.0)
    tokens_per_expert = (assigned * weight[:, None, None]).sum(dim=0) / total  # (k, E)
    prob_per_expert = (probs * weight[:, None]).sum(dim=0) / total  # (E,)
    return num_experts * (tokens_per_expert * prob_per_expert.unsqueeze(0)).sum()


def _init_a(rows: int, cols: int, config: MixLoraConfig, generator: torch.Generator) -> torch.Tensor:
    A = torch.empty(rows, cols)
    if config.lora_init == "gaussian":
        torch.nn.init.normal_(A, std=1.0 / config.r, generator=generator)
    else:  # torch.nn.Linear's own init, as the reference's LoraLinear uses
        torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
    return A


def initial_adapter(model, config: MixLoraConfig, seed: int, device, name: str = "mixlora") -> MixLoraAdapter:
    """A fresh adapter whose fp32 tensors are leaves that require grad."""
    generator = torch.Generator().manual_seed(seed)
    num_layers, hidden = model.config.num_hidden_layers, model.config.hidden_size
    routers, attention, experts = [], {}, {}
    for layer in range(num_layers):
        routers.append(
            torch.empty(config.num_experts, hidden).normal_(0.0, config.router_init_range, generator=generator)
        )
        for module in config.attention_targets:
            d_in, d_out = linear_shape(model, layer, module)
            attention[(layer, module)] = LoraFactors(
                _init_a(config.r, d_in, config, generator), torch.zeros(d_out, config.r), config.scale
            )
        for module in config.expert_targets:
            d_in, d_out = linear_shape(model, layer, module)
            A = torch.stack([_init_a(config.r, d_in, config, generator) for _ in range(config.num_experts)])
            experts[(layer, module)] = ExpertFactors(A, torch.zeros(config.num_experts, d_out, config.r), config.scale)
    adapter = MixLoraAdapter(name=name, config=config, routers=routers, attention=attention, experts=experts)
    adapter.routers = [r.to(device).requires_grad_(True) for r in adapter.routers]
    for f in list(adapter.attention.values()) + list(adapter.experts.values()):
        f.A, f.B = f.A.to(device).requires_grad_(True), f.B.to(device).requires_grad_(True)
    return adapter


def _remember_attention_mask(module, args, kwargs):
    """Forward pre-hook on the causal LM: hand a training run its batch's padding mask."""
    run = current_run()
    if run is not None and run.plan.method == "mixlora" and run.plan.info.get("training"):
        mask = kwargs.get("attention_mask")
        run.attention_mask = mask if mask is not None and mask.dim() == 2 else None


def config_from_params(ctx: BuildContext, params: dict, options: dict) -> MixLoraConfig:
    targets = [t.strip() for t in str(params["target_modules"]).replace(";", ",").split(",") if t.strip()]
    unknown = [t for t in targets if t not in ALL_MODULES]
    if unknown or not targets:
        named = unknown[0] if unknown else "nothing"
        raise FusionError(
            f"parameter 'target_modules' of method 'mixlora' names {named}; choose among {', '.join(ALL_MODULES)}"
        )
    top_k = params.get("top_k") or 2
    if top_k > params["num_experts"]:
        raise FusionError(
            f"parameter 'top_k' of method 'mixlora' is {top_k}, more than num_experts ({params['num_experts']})"
        )
    act_fn = getattr(ctx.model.config, "hidden_act", None)
    base = options.get("base_model_name_or_path") or getattr(ctx.model.config, "_name_or_path", "") or ""
    return MixLoraConfig(
        r=params["r"],
        lora_alpha=params["lora_alpha"],
        lora_dropout=params["lora_dropout"],
        target_modules=tuple(m for m in ALL_MODULES if m in targets),
        num_experts=params["num_experts"],
        top_k=top_k,
        act_fn=act_fn if isinstance(act_fn, str) else None,
        router_aux_loss_coef=params["aux_loss_coef"],
        router_init_range=params["router_init_range"],
        lora_init=params["lora_init"],
        base_model=str(base),
    )


def fit_mixlora(ctx: BuildContext, examples, params: dict, options: dict, on_progress=None, cancel=None) -> FitResult:
    """Train a new MixLoRA adapter; the result writes it with `save_adapter(folder)`."""
    config = config_from_params(ctx, params, options)
    adapter = initial_adapter(ctx.model, config, params["seed"], ctx.device)
    train_config = TrainConfig(**{**TRAIN_DEFAULTS, **options.get("train", {})})

    def aux_loss(run: Run) -> torch.Tensor:
        if not run.extra_losses or config.router_aux_loss_coef == 0:
            return torch.zeros((), device=ctx.device)
        return config.router_aux_loss_coef * load_balancing_loss(
            run.extra_losses, config.num_experts, config.top_k, getattr(run, "attention_mask", None)
        )

    hook = ctx.model.register_forward_pre_hook(_remember_attention_mask, with_kwargs=True)
    try:
        losses = train(
            ctx.model,
            adapter.tensors(),
            lambda: plan_from_adapter(ctx, adapter, config.top_k, training=True),
            examples,
            train_config,
            options["pad_id"],
            ctx.device,
            on_progress,
            cancel,
            extra_loss=aux_loss,
        )
    finally:
        hook.remove()
    trained = MixLoraAdapter(
        name=adapter.name,
        config=config,
        routers=[r.detach() for r in adapter.routers],
        attention={k: LoraFactors(f.A.detach(), f.B.detach(), f.scale) for k, f in adapter.attention.items()},
        experts={k: ExpertFactors(f.A.detach(), f.B.detach(), f.scale) for k, f in adapter.experts.items()},
    )

    def save_adapter(folder: Path) -> None:
        save_mixlora(trained, Path(folder))

    return FitResult(
        losses=losses,
        save_adapter=save_adapter,
        meta={
            "num_experts": config.num_experts,
            "top_k": config.top_k,
            "r": config.r,
            "lora_alpha": config.lora_alpha,
            "target_modules": list(config.target_modules),
            "aux_loss_coef": config.router_aux_loss_coef,
            "seed": params["seed"],
            "train": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(train_config).items()},
        },
    )
