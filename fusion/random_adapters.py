"""Random adapters of a base model's shape, written in their checkpoint formats: rank-r LoRAs on
all seven projections (peft) and a MixLoRA with E experts (the `mixlora` package's format). The
benchmarks write them to a temporary folder so that their figures do not depend on a library's
contents."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _linear_shapes(model) -> dict[str, tuple[int, int]]:
    layer = model.model.layers[0]
    shapes = {}
    for name in TARGETS:
        block = layer.self_attn if name in TARGETS[:4] else layer.mlp
        lin = getattr(block, name)
        shapes[name] = (lin.in_features, lin.out_features)
    return shapes


def write_random_lora(folder: Path, model, rank: int = 8, alpha: int = 16, seed: int = 0, std: float = 0.02):
    g = torch.Generator().manual_seed(seed)
    state = {}
    for layer in range(model.config.num_hidden_layers):
        for name, (d_in, d_out) in _linear_shapes(model).items():
            block = "self_attn" if name in TARGETS[:4] else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{block}.{name}"
            state[f"{prefix}.lora_A.weight"] = torch.randn(rank, d_in, generator=g) * std
            state[f"{prefix}.lora_B.weight"] = torch.randn(d_out, rank, generator=g) * std
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "task_type": "CAUSAL_LM",
                "r": rank,
                "lora_alpha": alpha,
                "lora_dropout": 0.0,
                "target_modules": list(TARGETS),
                "bias": "none",
                "base_model_name_or_path": "",
            }
        )
    )
    save_file(state, str(folder / "adapter_model.safetensors"))
    return folder


def write_random_mixlora(
    folder: Path,
    model,
    base_folder: str,
    experts: int = 8,
    top_k: int = 2,
    rank: int = 8,
    alpha: int = 16,
    seed: int = 0,
    std: float = 0.02,
):
    g = torch.Generator().manual_seed(seed)
    state = {}
    for layer in range(model.config.num_hidden_layers):
        state[f"mixlora.layers.{layer}.mlp.moe_gate.weight"] = (
            torch.randn(experts, model.config.hidden_size, generator=g) * 0.02
        )
        for name, (d_in, d_out) in _linear_shapes(model).items():
            prefixes = (
                [f"mixlora.layers.{layer}.self_attn.{name}"]
                if name in TARGETS[:4]
                else [f"mixlora.layers.{layer}.mlp.{name}.experts.{e}" for e in range(experts)]
            )
            for prefix in prefixes:
                state[f"{prefix}.lora_A.weight"] = torch.randn(rank, d_in, generator=g) * std
                state[f"{prefix}.lora_B.weight"] = torch.randn(d_out, rank, generator=g) * std
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "MIXLORA",
                "task_type": "CAUSAL_LM",
                "base_model_name_or_path": base_folder,
                "r": rank,
                "lora_alpha": alpha,
                "lora_dropout": 0.05,
                "target_modules": list(TARGETS),
                "routing_strategy": "mixlora",
                "num_experts": experts,
                "top_k": top_k,
                "act_fn": "silu",
                "bias": "none",
            }
        )
    )
    torch.save(state, str(folder / "adapter_model.bin"))
    return folder
