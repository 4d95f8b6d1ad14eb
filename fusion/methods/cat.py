"""`cat`: LoRA Soups' CAT (Prabhakar et al. 2024).

One learnable logit per LoRA per wrapped Linear; delta = sum_i softmax(alpha)_i s_i B_i A_i x.
That equals a single LoRA of rank sum(r_i) built by concatenating the factors, so the fitted
result merges exactly. Only the logits are trained.

The fit's budget is what lets the weights leave uniform: Adam moves a logit by at most about
lr per step, so a cosine schedule over S steps moves it by at most ~lr * S / 2. The reference's
lr 1e-4 for one epoch assumes ~10k examples; on a few hundred it keeps every weight within a
few hundredths of 1/k, i.e. plain averaging. The default, 250 steps at lr 1e-2 (~1.25 logit
units of reach, enough for a 0.78 / 0.22 split of two LoRAs), is fixed by steps, not epochs,
so small data sets get the same reach.
"""

import math

import torch

from ..errors import FusionError
from ..runtime import FusionPlan
from ..training import TrainConfig, train
from .base import BuildContext, FitResult, FusionMethod, Param, module_keys, stacked_delta


class CatMethod(FusionMethod):
    name = "cat"
    pretty_name = "CAT (LoRA Soups)"
    kind = "static"
    reference_url = "https://arxiv.org/abs/2410.13025"
    description = (
        "Concatenated LoRAs with one learned softmax weight per LoRA per layer and module; "
        "without fitted logits every LoRA gets 1/k."
    )
    params = (
        Param("logits", "artifact", "", "Fitted CAT logits: a fusion name or folder; empty = uniform."),
        Param(
            "fit_lr",
            "float",
            1e-2,
            "Fitting: peak learning rate of the logits (Adam, cosine).",
            min=1e-6,
            max=10.0,
            fit_only=True,
        ),
        Param(
            "fit_steps",
            "int",
            250,
            "Fitting: optimiser steps (batch 4; the data is repeated as needed).",
            min=1,
            max=100000,
            fit_only=True,
        ),
    )
    min_adapters = 2
    fittable = True

    def build(self, ctx: BuildContext, adapters, params) -> FusionPlan:
        keys = module_keys(adapters)
        logits = torch.zeros(len(keys), len(adapters))
        if params.get("logits"):
            logits = self.load_logits(ctx, params["logits"], keys, len(adapters))
        return self.plan_from_logits(ctx, adapters, keys, logits)

    def plan_from_logits(self, ctx, adapters, keys, logits: torch.Tensor, keep_coef=False) -> FusionPlan:
        weights = torch.softmax(logits, dim=-1)  # (modules, k)
        deltas = {
            key: stacked_delta(ctx, adapters, key, weights[m], dynamic=False, keep_coef=keep_coef)
            for m, key in enumerate(keys)
        }
        per_module: dict[str, torch.Tensor] = {}
        for m, (layer, module) in enumerate(keys):
            per_module.setdefault(module, torch.full((ctx.num_layers, len(adapters)), float("nan")))
            per_module[module][layer] = weights[m].detach().float()
        stacked = torch.stack(list(per_module.values()))  # (modules, layers, k)
        static = torch.nanmean(stacked, dim=0).nan_to_num(0.0)
        return FusionPlan(
            method=self.name,
            slot_names=[a.name for a in adapters],
            deltas=deltas,
            static_weights=static,
            module_weights=per_module,
        )

    @staticmethod
    def load_logits(ctx, ref, keys, k) -> torch.Tensor:
        artifact = ctx.resolve_artifact(ref)
        logits = artifact.tensors.get("logits")
        names = artifact.meta.get("modules")
        if logits is None or names is None:
            raise FusionError(f"{artifact.path}: not a CAT fit (needs tensor 'logits' and meta 'modules')")
        wanted = [f"{layer}.{module}" for layer, module in keys]
        if list(names) != wanted or tuple(logits.shape) != (len(keys), k):
            raise FusionError(
                f"{artifact.path}: CAT logits have shape {tuple(logits.shape)} over "
                f"{len(names)} modules; these adapters need ({len(keys)}, {k})"
            )
        return logits.float()

    def fit(self, ctx, adapters, examples, params, options, on_progress=None, cancel=None) -> FitResult:
        keys = module_keys(adapters)
        k = len(adapters)
        logits = torch.zeros(len(keys), k, requires_grad=True)
        train_options = dict(options.get("train", {}))
        steps = int(train_options.pop("max_steps", 0) or params.get("fit_steps") or 250)
        batch = int(train_options.get("batch_size", 4))
        epochs = train_options.pop("epochs", None) or math.ceil(steps / math.ceil(len(examples) / batch))
        config = TrainConfig(
            **{
                "lr": float(params.get("fit_lr") or 1e-2),
                "batch_size": batch,
                "weight_decay": 0.0,
                "warmup_ratio": 0.0,
                **train_options,
                "epochs": int(epochs),
                "max_steps": steps,
            }
        )
        losses = train(
            ctx.model,
            [logits],
            lambda: self.plan_from_logits(ctx, adapters, keys, logits, True),
            examples,
            config,
            options["pad_id"],
            ctx.device,
            on_progress,
            cancel,
        )
        shift = float((torch.softmax(logits.detach(), dim=-1) - 1.0 / k).abs().max())
        return FitResult(
            losses=losses,
            params={"fit_lr": config.lr, "fit_steps": len(losses)},
            tensors={"logits": logits.detach()},
            meta={
                "modules": [f"{layer}.{module}" for layer, module in keys],
                "lr": config.lr,
                "steps": len(losses),
                "max_weight_shift": round(shift, 5),
            },
            param_ref="logits",
        )
