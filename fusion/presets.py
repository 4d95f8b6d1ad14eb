"""One-step setups of the papers' own released checkpoints (for a GPU host with network).

`lora-flow:{lang}-{task}` wires LoRA-Flow's setup: Llama-2-7B, the authors' language and task
LoRAs and their fitted gates (temperature 1.1 for zh/ru math, as released).
`mixlora:alpaca-7b` is MixLoRA's released 8-expert adapter on Llama-2-7B.
"""

from __future__ import annotations

from dataclasses import dataclass

from .engine import FusionRequest
from .errors import FusionError

LLAMA2_7B = "meta-llama/Llama-2-7b-hf"
LORA_FLOW_REPO = "hf:Bowen232/LoRA-Flow"
LORA_FLOW_LANGUAGES = ("zh", "ru", "es")
LORA_FLOW_TASKS = ("math", "code")


@dataclass
class Preset:
    name: str
    model: str
    request: FusionRequest
    description: str


def lora_flow_preset(language: str, task: str) -> Preset:
    if language not in LORA_FLOW_LANGUAGES or task not in LORA_FLOW_TASKS:
        raise FusionError(
            f"LoRA-Flow released gates for {LORA_FLOW_LANGUAGES} x {LORA_FLOW_TASKS}; got {language}-{task}"
        )
    temperature = 1.1 if task == "math" and language in ("zh", "ru") else 1.0
    request = FusionRequest(
        adapters=[f"{LORA_FLOW_REPO}/LoRAs/{language}_lora", f"{LORA_FLOW_REPO}/LoRAs/{task}_lora"],
        method="lora_flow",
        params={"gates": f"{LORA_FLOW_REPO}/Gates/{language}_{task}.pt", "temperature": temperature},
    )
    return Preset(
        f"lora-flow:{language}-{task}",
        LLAMA2_7B,
        request,
        f"LoRA-Flow paper: {language} language LoRA + {task} task LoRA with the released gates",
    )


def get_preset(name: str) -> Preset:
    if name.startswith("lora-flow:") and "-" in name.split(":", 1)[1]:
        language, task = name.split(":", 1)[1].split("-", 1)
        return lora_flow_preset(language, task)
    if name == "mixlora:alpaca-7b":
        return Preset(
            name,
            LLAMA2_7B,
            FusionRequest(["hf:TUDB-Labs/alpaca-mixlora-7b"], "mixlora"),
            "MixLoRA's released 8-expert top-2 adapter trained on Alpaca",
        )
    raise FusionError(f"unknown preset {name!r}; choose one of: {', '.join(preset_names())}")


def preset_names() -> list[str]:
    return [f"lora-flow:{l}-{t}" for l in LORA_FLOW_LANGUAGES for t in LORA_FLOW_TASKS] + ["mixlora:alpaca-7b"]
