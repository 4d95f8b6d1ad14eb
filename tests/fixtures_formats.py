"""Adapter files in the formats found in the wild, a tiny tokenizer, and independent references.

The references here never call the engine: they write plain LoRA deltas into a copy of the
base model's weights, or ask peft itself, so a test compares the engine against a second,
straightforward computation of the same formula.
"""

from __future__ import annotations

import copy
import json
import zipfile
from pathlib import Path

import torch
from helpers import MODULES

ATTENTION = MODULES[:4]


# ---- a tiny tokenizer -------------------------------------------------------------------------
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer():
    """Byte-level tokenizer without merges (one token per byte) plus ChatML specials: 259 ids.

    Any text round-trips, so examples written as text tokenise to exactly the ids we chose.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    for index, char in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet())):
        vocab[char] = 3 + index
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tokenizer


# ---- reading LoRA factors straight from a state dict ------------------------------------------
def block_of(module: str) -> str:
    return "self_attn" if module in ATTENTION else "mlp"


def lora_key(layer: int, module: str, half: str) -> str:
    return f"base_model.model.model.layers.{layer}.{block_of(module)}.{module}.lora_{half}.weight"


def factors(state: dict, layer: int, module: str):
    """(A (r, d_in), B (d_out, r)) in fp32, or None where the LoRA does not touch the module."""
    a, b = lora_key(layer, module, "A"), lora_key(layer, module, "B")
    if a not in state:
        return None
    return state[a].float(), state[b].float()


def linear_of(model, layer: int, module: str) -> torch.nn.Linear:
    block = model.model.layers[layer].self_attn if module in ATTENTION else model.model.layers[layer].mlp
    return getattr(block, module)


# ---- references -------------------------------------------------------------------------------
def merged_copy(pristine, deltas: dict[tuple[int, str], torch.Tensor]):
    """A deep copy of the base model with each dense delta (d_out, d_in) added to its weight."""
    model = copy.deepcopy(pristine)
    with torch.no_grad():
        for (layer, module), delta in deltas.items():
            linear_of(model, layer, module).weight += delta
    return model


def weighted_sum_deltas(pristine, states: list[dict], scales: list[float], weights: list[float]):
    """sum_i w_i s_i B_i A_i per module: the exact linear combination, one LoRA at a time."""
    deltas = {}
    for layer in range(pristine.config.num_hidden_layers):
        for module in MODULES:
            total = None
            for state, s, w in zip(states, scales, weights):
                pair = factors(state, layer, module)
                if pair is None:
                    continue
                A, B = pair
                term = w * s * (B @ A)
                total = term if total is None else total + term
            if total is not None:
                deltas[(layer, module)] = total
    return deltas


def lorahub_deltas(pristine, states: list[dict], scale: float, weights: list[float]):
    """(sum_i w_i B_i)(sum_i w_i A_i) * s: LoraHub's element-wise factor sum, cross terms included."""
    deltas = {}
    for layer in range(pristine.config.num_hidden_layers):
        for module in MODULES:
            pairs = [(factors(st, layer, module), w) for st, w in zip(states, weights)]
            pairs = [(p, w) for p, w in pairs if p is not None]
            if not pairs:
                continue
            A = sum(w * p[0] for p, w in pairs)
            B = sum(w * p[1] for p, w in pairs)
            deltas[(layer, module)] = scale * (B @ A)
    return deltas


def cat_deltas(pristine, states: list[dict], scales: list[float], logits: dict[tuple[int, str], torch.Tensor]):
    """sum_i softmax(alpha_m)_i s_i B_i A_i with one logit vector alpha_m per module."""
    deltas = {}
    for key, alpha in logits.items():
        weights = torch.softmax(alpha.float(), dim=-1).tolist()
        single = weighted_sum_deltas(pristine, states, scales, weights)
        if key in single:
            deltas[key] = single[key]
    return deltas


@torch.no_grad()
def forward_logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits


def peft_model(pristine, folders: list[Path]):
    """peft's own model over a fresh copy of the base, adapters named a0, a1, ... in order."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(copy.deepcopy(pristine), str(folders[0]), adapter_name="a0")
    for index, folder in enumerate(folders[1:], 1):
        model.load_adapter(str(folder), adapter_name=f"a{index}")
    return model.eval()


@torch.no_grad()
def peft_logits(model, adapter: str, ids: torch.Tensor) -> torch.Tensor:
    model.set_adapter(adapter)
    return model(input_ids=ids, use_cache=False).logits


# ---- adapter folders in other formats ---------------------------------------------------------
def write_config(folder: Path, **fields) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "target_modules": list(MODULES),
        "bias": "none",
        "base_model_name_or_path": "tiny-llama",
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
    config.update(fields)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def write_legacy_bin(folder: Path, state: dict, rank: int, alpha: float) -> Path:
    """LoRA-Flow's released style: torch.save'd fp16 pickle, keys without the adapter name."""
    write_config(folder, r=rank, lora_alpha=alpha)
    torch.save({k: v.half() for k, v in state.items()}, str(folder / "adapter_model.bin"))
    return folder


def write_peft_saved(folder: Path, pristine, seed: int = 7, **config_fields):
    """A LoRA built and saved by peft itself (non-zero B); returns (folder, peft model)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=list(MODULES),
        lora_dropout=0.0,
        init_lora_weights=False,
        task_type="CAUSAL_LM",
        **config_fields,
    )
    model = get_peft_model(copy.deepcopy(pristine), config).eval()
    with torch.no_grad():  # nn.Linear's default init is tiny at this width; make deltas visible
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.mul_(3.0)
    model.save_pretrained(str(folder))
    return folder, model


class CodePayload:
    """Unpickling this calls Path.touch(marker): a stand-in for arbitrary code execution."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def write_code_payload_bin(folder: Path, state: dict, marker: Path) -> Path:
    write_config(folder)
    payload = dict(state)
    payload["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] = CodePayload(marker)
    torch.save(payload, str(folder / "adapter_model.bin"))
    return folder


def zip_folder(folder: Path, archive: Path, prefix: str = "", extra: dict[str, bytes] | None = None) -> Path:
    with zipfile.ZipFile(archive, "w") as zf:
        for item in sorted(folder.iterdir()):
            zf.write(item, prefix + item.name)
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return archive
