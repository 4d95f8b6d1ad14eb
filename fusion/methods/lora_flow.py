"""`lora_flow`: LoRA-Flow (Wang et al., ACL 2024), dynamic per-layer, per-token fusion gates.

Per decoder layer l: a gate W_l (k x d, no bias, zero-init) and a bias b_l (1 x k) read the
residual stream h entering the layer (before input_layernorm), per token:
    w = softmax(W_l h / T) + b_l          (not renormalised: values may leave [0, 1])
and the same w scales every LoRA-wrapped projection of that layer:
    y = W x + sum_i w_i s_i B_i A_i x.
Slot order: language LoRA first, task LoRA last. b starts at onehot(task) - 1/k, which for
k = 2 is the paper's [-0.5, 0.5]: fusion starts as "all task LoRA".
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import FusionError
from ..hub import resolve_ref
from ..runtime import FusionPlan
from ..safe_io import load_tensor_file
from ..training import Example, TrainConfig, train
from .base import BuildContext, FitResult, FusionMethod, Param, module_keys, stacked_delta

_RELEASED_KEY = re.compile(r"(\d+)")


def initial_bias(num_layers: int, k: int) -> torch.Tensor:
    bias = torch.full((num_layers, 1, k), -1.0 / k)  # (L, 1, k)
    bias[..., -1] += 1.0
    return bias


def load_released_gates(path: str | Path, num_layers: int, hidden: int, k: int):
    """The authors' `{lang}_{task}.pt`: encoder.layers.{i}.lora_fusion_gate.weight [k, d] and
    encoder.layers.{i}.weight_bias [1, k]. Returns (W (L, k, d), b (L, 1, k))."""
    state = load_tensor_file(path)
    W = [None] * num_layers
    b = [None] * num_layers
    for key, tensor in state.items():
        found = _RELEASED_KEY.search(key)
        if found is None:
            continue
        layer = int(found.group(1))
        if layer >= num_layers:
            raise FusionError(f"{path}: {key} is for layer {layer}, but the base model has {num_layers} layers")
        if key.endswith("lora_fusion_gate.weight"):
            if tuple(tensor.shape) != (k, hidden):
                raise FusionError(
                    f"{path}: {key} has shape {tuple(tensor.shape)}; expected ({k}, {hidden}) "
                    f"for {k} LoRAs on this base model"
                )
            W[layer] = tensor.float()
        elif key.endswith("weight_bias"):
            if tuple(tensor.shape) != (1, k):
                raise FusionError(f"{path}: {key} has shape {tuple(tensor.shape)}; expected (1, {k})")
            b[layer] = tensor.float()
    missing = [i for i in range(num_layers) if W[i] is None or b[i] is None]
    if missing:
        raise FusionError(
            f"{path}: no gate weight/bias for layer {missing[0]} "
            f"(expected encoder.layers.{missing[0]}.lora_fusion_gate.weight and .weight_bias)"
        )
    return torch.stack(W), torch.stack(b)


def save_released_gates(W: torch.Tensor, b: torch.Tensor, path: str | Path) -> None:
    """Write gates in the authors' key layout (useful for interop and tests)."""
    state = {}
    for layer in range(W.shape[0]):
        state[f"encoder.layers.{layer}.lora_fusion_gate.weight"] = W[layer].clone()
        state[f"encoder.layers.{layer}.weight_bias"] = b[layer].clone()
    torch.save(state, str(path))


class LoraFlowMethod(FusionMethod):
    name = "lora_flow"
    pretty_name = "LoRA-Flow (dynamic gates)"
    kind = "dynamic"
    reference_url = "https://arxiv.org/abs/2402.11455"
    description = (
        "Per-layer gates read each token's hidden state and weight the LoRAs per token; "
        "language LoRA first, task LoRA last."
    )
    params = (
        Param(
            "gates",
            "artifact",
            "",
            "Fitted gates: a fusion name, a folder, or the authors' .pt file; empty = initial gates (all task LoRA).",
        ),
        Param(
            "temperature",
            "float",
            None,
            "Softmax temperature T (default: the gates' own, else 1.0; the released zh/ru math gates use 1.1).",
            min=0.05,
            max=20.0,
        ),
    )
    min_adapters = 2
    fittable = True

    def load_gates(self, ctx: BuildContext, ref: str, k: int):
        """Returns (W (L, k, d), b (L, 1, k), temperature or None)."""
        path = Path(resolve_ref(ref)).expanduser()
        if path.is_file():
            W, b = load_released_gates(path, ctx.num_layers, ctx.hidden_size, k)
            return W, b, None
        artifact = ctx.resolve_artifact(ref)
        try:
            W = torch.stack([artifact.tensors[f"gate.{l}.weight"] for l in range(ctx.num_layers)])
            b = torch.stack([artifact.tensors[f"gate.{l}.bias"] for l in range(ctx.num_layers)])
        except KeyError as exc:
            raise FusionError(
                f"{artifact.path}: gate tensor {exc.args[0]} is missing "
                f"(expected gate.0..{ctx.num_layers - 1}.weight/bias)"
            ) from None
        if tuple(W.shape[1:]) != (k, ctx.hidden_size) or tuple(b.shape[1:]) != (1, k):
            raise FusionError(
                f"{artifact.path}: gates have shape {tuple(W.shape[1:])}; expected "
                f"({k}, {ctx.hidden_size}) for {k} LoRAs on this base model"
            )
        return W.float(), b.float(), artifact.meta.get("temperature")

    def build(self, ctx: BuildContext, adapters, params) -> FusionPlan:
        k = len(adapters)
        if params.get("gates"):
            W, b, saved_t = self.load_gates(ctx, params["gates"], k)
        else:
            W, b, saved_t = torch.zeros(ctx.num_layers, k, ctx.hidden_size), initial_bias(ctx.num_layers, k), None
        temperature = params.get("temperature") or saved_t or 1.0
        return self.plan_from_gates(ctx, adapters, W, b, float(temperature))

    def plan_from_gates(self, ctx, adapters, W: torch.Tensor, b: torch.Tensor, temperature: float) -> FusionPlan:
        W = W.to(ctx.device, ctx.dtype)  # (L, k, d)
        b = b.to(ctx.device, ctx.dtype)  # (L, 1, k)

        # Per-layer views taken once per plan, and no division when T = 1: the gate is 3 ops a layer.
        Ws, bs = W.unbind(0), b.unbind(0)

        def gate(layer: int, hidden: torch.Tensor) -> torch.Tensor:
            logits = F.linear(hidden, Ws[layer])  # (B, T, k)
            if temperature != 1.0:
                logits = logits / temperature
            return torch.softmax(logits, dim=-1) + bs[layer]

        deltas = {key: stacked_delta(ctx, adapters, key, None, dynamic=True) for key in module_keys(adapters)}
        return FusionPlan(
            method=self.name,
            slot_names=[a.name for a in adapters],
            deltas=deltas,
            layer_gate=gate,
            trace_kind="gate",
            gate_tensors=(W, b, temperature),
            info={"temperature": temperature},
        )

    def fit(self, ctx, adapters, examples, params, options, on_progress=None, cancel=None) -> FitResult:
        """Options beyond "train": "dev" (tokenized examples: the dev loss is measured after every
        epoch and the gates of the best epoch are kept) and "inference_temperature" (saved with
        the gates and used when they are loaded; the paper fits at T = 1 and decodes zh/ru math
        at T = 1.1)."""
        k = len(adapters)
        temperature = float(params.get("temperature") or 1.0)
        inference_temperature = float(options.get("inference_temperature") or temperature)
        if not 0.05 <= inference_temperature <= 20.0:
            raise FusionError(f"inference_temperature {inference_temperature} is outside 0.05..20")
        dev = options.get("dev") or None
        if dev is not None and not all(isinstance(e, Example) for e in dev):
            raise FusionError("dev examples must be tokenized (fusion.training.tokenize_records)")
        W = torch.zeros(ctx.num_layers, k, ctx.hidden_size, requires_grad=True)
        b = initial_bias(ctx.num_layers, k).requires_grad_(True)
        config = TrainConfig(**options.get("train", {}))
        dev_losses: list[float] = []
        losses = train(
            ctx.model,
            [W, b],
            lambda: self.plan_from_gates(ctx, adapters, W, b, temperature),
            examples,
            config,
            options["pad_id"],
            ctx.device,
            on_progress,
            cancel,
            dev=dev,
            dev_losses=dev_losses,
        )
        tensors = {}
        for layer in range(ctx.num_layers):
            tensors[f"gate.{layer}.weight"] = W[layer].detach()
            tensors[f"gate.{layer}.bias"] = b[layer].detach()
        meta = {
            "temperature": inference_temperature,
            "fit_temperature": temperature,
            "slots": [a.name for a in adapters],
        }
        if dev is not None:
            meta.update(
                dev_examples=len(dev),
                dev_losses=[round(x, 5) for x in dev_losses],
                best_epoch=(dev_losses.index(min(dev_losses)) + 1) if dev_losses else None,
            )
        return FitResult(losses=losses, tensors=tensors, meta=meta, param_ref="gates")
