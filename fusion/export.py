"""Export a static fusion as a standard peft LoRA folder, or as a full merged model.

Every static method's result is already one low-rank update per module (linear, cat and
LoraHub exactly; TIES/DARE as the factors peft produces), so the export is exact: the factors
are written with alpha = r (scale 1) and the static scales folded into B. Modules whose rank
differs from the most common one are listed in rank_pattern/alpha_pattern. Serving engines
that take peft LoRAs (e.g. vLLM with --enable-lora) can then serve the fusion; dynamic methods
(lora_flow, mixlora) compute per token and cannot be exported this way.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from safetensors.torch import save_file

from .adapters import ATTENTION_MODULES
from .errors import FusionError
from .runtime import delta_factors
from .safe_io import atomic_folder


def _module_name(layer: int, module: str) -> str:
    block = "self_attn" if module in ATTENTION_MODULES else "mlp"
    return f"model.layers.{layer}.{block}.{module}"


def export_peft(engine, request, out: str | Path, overwrite: bool = False) -> Path:
    plan = engine.plan(request)
    if not plan.is_static:
        raise FusionError(
            f"method {plan.method!r} fuses per token; only static fusions export as a LoRA "
            "(serve dynamic methods with this engine)"
        )
    if not plan.deltas:
        raise FusionError(f"method {plan.method!r} has no adapter delta to export")
    state, ranks = {}, {}
    for (layer, module), delta in sorted(plan.deltas.items()):
        A, B = delta_factors(delta)
        name = _module_name(layer, module)
        state[f"base_model.model.{name}.lora_A.weight"] = A.detach().float().cpu().contiguous()
        state[f"base_model.model.{name}.lora_B.weight"] = B.detach().float().cpu().contiguous()
        ranks[name] = A.shape[0]
    rank = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {name: r for name, r in ranks.items() if r != rank}
    _, adapters, params = engine.resolve(request)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": rank,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": sorted({m for _, m in plan.deltas}),
        "fan_in_fan_out": False,
        "use_rslora": False,
        "base_model_name_or_path": engine.base.info.get("source", ""),
        "inference_mode": True,
    }
    with atomic_folder(out, overwrite=overwrite) as tmp:
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        save_file(state, str(tmp / "adapter_model.safetensors"))
        (tmp / "studio.json").write_text(
            json.dumps(
                {
                    "role": "other",
                    "description": f"{plan.method} fusion of {', '.join(a.name for a in adapters)}",
                    "fusion": {"method": plan.method, "adapters": [a.name for a in adapters], "params": params},
                    "max_rank": max(ranks.values()),
                },
                indent=2,
                default=str,
            ),
            encoding="utf-8",
        )
    return Path(out)


def export_merged(engine, request, out: str | Path, overwrite: bool = False, max_shard_size: str = "2GB") -> Path:
    """The base model with the static fusion merged in: sharded safetensors, config, tokenizer."""
    plan = engine.plan(request)
    with engine.using(plan, merge=True), atomic_folder(out, overwrite=overwrite) as tmp:
        engine.model.save_pretrained(str(tmp), max_shard_size=max_shard_size, safe_serialization=True)
        if engine.tokenizer is not None:
            engine.tokenizer.save_pretrained(str(tmp))
    return Path(out)
