"""MixLoRA checkpoints written in the reference package's format, and that package's model over them."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from helpers import MODULES, shape_of, tiny_model

ATTENTION = MODULES[:4]
FFN = MODULES[4:]


def saved_tiny_model(folder: Path, seed: int = 0, head_std: float | None = None, **config_kwargs):
    """A tiny random Llama saved with save_pretrained and loaded back: the reference package
    loads its base model from `base_model_name_or_path`, so both sides read the same weights.

    `head_std` re-draws the output head: with the default init (std 0.02) a frozen head caps
    every logit near 0.6, so no adapter could lower a toy loss much.
    """
    from transformers import LlamaForCausalLM

    model = tiny_model(seed=seed, **config_kwargs)
    if head_std is not None:
        with torch.no_grad():
            model.lm_head.weight.normal_(0.0, head_std, generator=torch.Generator().manual_seed(seed))
    model.save_pretrained(folder)
    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def mixlora_state(
    model,
    num_experts: int = 4,
    rank: int = 4,
    seed: int = 0,
    targets=MODULES,
    std: float = 0.2,
    router_std: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Random non-zero LoRA A and B for every target and expert, and a random router per layer."""
    g = torch.Generator().manual_seed(seed)
    hidden = model.config.hidden_size
    state = {}
    for layer in range(model.config.num_hidden_layers):
        router = torch.randn(num_experts, hidden, generator=g) * router_std
        state[f"mixlora.layers.{layer}.mlp.moe_gate.weight"] = router
        for module in targets:
            d_in, d_out = shape_of(model, module)
            if module in ATTENTION:
                prefixes = [f"mixlora.layers.{layer}.self_attn.{module}"]
            else:
                prefixes = [f"mixlora.layers.{layer}.mlp.{module}.experts.{e}" for e in range(num_experts)]
            for prefix in prefixes:
                state[f"{prefix}.lora_A.weight"] = torch.randn(rank, d_in, generator=g) * std
                state[f"{prefix}.lora_B.weight"] = torch.randn(d_out, rank, generator=g) * std
    return state


def mixlora_config(
    base_folder: Path,
    num_experts: int = 4,
    top_k: int = 2,
    rank: int = 4,
    alpha: int = 8,
    targets=MODULES,
    act_fn: str | None = "silu",
    **extra,
) -> dict:
    config = {
        "bias": "none",
        "peft_type": "MIXLORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base_folder),
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.05,
        "target_modules": list(targets),
        "routing_strategy": "mixlora",
        "num_experts": num_experts,
        "top_k": top_k,
    }
    if act_fn is not None:
        config["act_fn"] = act_fn
    config.update(extra)
    return config


def write_mixlora(folder: Path, config: dict, state: dict[str, torch.Tensor], fmt: str = "bin") -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "adapter_model.safetensors"))
    else:
        torch.save(state, str(folder / "adapter_model.bin"))
    return folder


def reference_model(folder: Path):
    """The reference package's model over a checkpoint folder, made deterministic.

    It builds its LoRA layers after from_pretrained has put the model in eval mode, and keeps
    the expert LoRAs in plain dicts that model.eval() never reaches, so their dropout would stay
    active at inference; switch every one of them off by hand.
    """
    from mixlora import MixLoraModelForCausalLM

    model, _ = MixLoraModelForCausalLM.from_pretrained(str(folder))
    model.eval()
    for layer in model.model.layers:
        for moe in getattr(layer.mlp, "mixlora_moes", {}).values():
            for lora in moe.experts_.values():
                lora.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def make_engine(model, root: Path):
    from fusion.engine import Engine
    from fusion.model import BaseModel

    return Engine(
        base=BaseModel(model, None, "tiny", torch.device("cpu"), torch.float32),
        adapters_dir=Path(root) / "adapters",
        fusions_dir=Path(root) / "fusions",
    )
