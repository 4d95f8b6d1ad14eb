"""Tiny random Llama models and LoRA folders written in the formats the engine reads."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Seed of the data and training in the numeric tests (marked `numeric`); tests/measure_margins.py
# sweeps it, with thread counts and CPU paths, to measure the spread of what they assert.
TEST_SEED = int(os.environ.get("LORA_STUDIO_TEST_SEED", "0"))


def tiny_config(layers: int = 3, hidden: int = 32, vocab: int = 96):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden + 8,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def tiny_model(seed: int = 0, **config_kwargs):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(**config_kwargs)).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def shape_of(model, module: str) -> tuple[int, int]:
    layer = model.model.layers[0]
    block = layer.self_attn if module in MODULES[:4] else layer.mlp
    linear = getattr(block, module)
    return linear.in_features, linear.out_features


def lora_state(
    model, rank: int = 4, seed: int = 1, modules=MODULES, legacy: bool = False, std: float = 0.2
) -> dict[str, torch.Tensor]:
    """Random A and B (both non-zero, so every delta is visible)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    suffix = "" if legacy else ".default"
    for layer in range(model.config.num_hidden_layers):
        for module in modules:
            d_in, d_out = shape_of(model, module)
            block = "self_attn" if module in MODULES[:4] else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{block}.{module}"
            state[f"{prefix}.lora_A{suffix}.weight"] = torch.randn(rank, d_in, generator=g) * std
            state[f"{prefix}.lora_B{suffix}.weight"] = torch.randn(d_out, rank, generator=g) * std
    if not legacy:  # peft saves without the adapter name; keep both spellings covered
        state = {k.replace(".default", ""): v for k, v in state.items()}
    return state


def write_lora(
    folder: Path,
    model,
    rank: int = 4,
    alpha: float = 8.0,
    seed: int = 1,
    modules=MODULES,
    fmt: str = "safetensors",
    role: str | None = None,
    legacy: bool = False,
    use_rslora: bool = False,
    state: dict | None = None,
) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": list(modules),
        "bias": "none",
        "base_model_name_or_path": "tiny-llama",
        "use_rslora": use_rslora,
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
    (folder / "adapter_config.json").write_text(json.dumps(config))
    state = state if state is not None else lora_state(model, rank, seed, modules, legacy)
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(state, str(folder / "adapter_model.safetensors"))
    else:
        torch.save(state, str(folder / "adapter_model.bin"))
    if role:
        (folder / "studio.json").write_text(json.dumps({"role": role}))
    return folder
