"""LoRA adapters: loading peft folders (new and legacy key styles), validation, metadata.

A loaded adapter is a plain table `(layer, module) -> LoraFactors(A, B, scale)`; nothing is
injected into the base model, so any number of requests can share one loaded copy.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import FusionError
from .safe_io import load_tensor_file, read_json

# Projection names of a Llama decoder layer, in the order the model runs them.
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
ALL_MODULES = ATTENTION_MODULES + MLP_MODULES
ROLES = ("language", "task", "other")

# Matches both peft styles: `...layers.3.self_attn.q_proj.lora_A.weight` (legacy, no adapter
# name, as in LoRA-Flow's released LoRAs) and `...q_proj.lora_A.default.weight`.
_LORA_KEY = re.compile(
    r"layers\.(?P<layer>\d+)\.(?:self_attn|mlp)\.(?P<module>[a-z_]+_proj)\."
    r"lora_(?P<ab>[AB])(?:\.[\w-]+)?\.weight$"
)
_MAX_RANK = 4096


@dataclass
class LoraFactors:
    """One LoRA on one Linear: delta(x) = scale * B @ A @ x."""

    A: torch.Tensor  # (r, d_in)
    B: torch.Tensor  # (d_out, r)
    scale: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def delta_weight(self) -> torch.Tensor:  # (d_out, d_in)
        return self.scale * (self.B @ self.A)


@dataclass
class LoraAdapter:
    name: str
    factors: dict[tuple[int, str], LoraFactors]
    role: str = "other"
    rank: int = 0
    alpha: float = 0.0
    targets: tuple[str, ...] = ()
    base_model: str = ""
    path: str = ""
    description: str = ""
    size_bytes: int = 0
    meta: dict = field(default_factory=dict)

    kind = "lora"

    def summary(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "role": self.role,
            "rank": self.rank,
            "alpha": self.alpha,
            "targets": list(self.targets),
            "base_model": self.base_model,
            "size_bytes": self.size_bytes,
            "description": self.description,
            "path": self.path,
        }

    def to(self, device, dtype) -> LoraAdapter:
        for f in self.factors.values():
            f.A = f.A.to(device=device, dtype=dtype)
            f.B = f.B.to(device=device, dtype=dtype)
        return self


def infer_role(name: str, declared: str | None = None) -> str:
    if declared in ROLES:
        return declared
    lowered = name.lower()
    if lowered.startswith(("lang-", "lang_", "language-")):
        return "language"
    if lowered.startswith(("task-", "task_")):
        return "task"
    return "other"


def find_weights_file(folder: Path) -> Path:
    for candidate in ("adapter_model.safetensors", "adapter_model.bin"):
        if (folder / candidate).is_file():
            return folder / candidate
    raise FusionError(f"{folder}: no adapter_model.safetensors or adapter_model.bin found")


PEFT_DEFAULT_ALPHA = 8  # LoraConfig's default when a config omits lora_alpha


def _scale(config: dict, module_key: str, rank: int, path: Path) -> float:
    """alpha/r (or alpha/sqrt(r) with rslora). alpha_pattern keys match the module's full name
    the way peft does: the first key that matches `(.*[.])?(key)$` wins."""
    alpha = config.get("lora_alpha", PEFT_DEFAULT_ALPHA)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module_key):
            alpha = value
            break
    try:
        alpha = float(alpha)
    except (TypeError, ValueError):
        raise FusionError(f"{path}: lora_alpha must be a number, got {alpha!r}") from None
    if config.get("use_rslora"):
        return alpha / math.sqrt(rank)
    return alpha / rank


def parse_lora_state(state: dict[str, torch.Tensor], config: dict, path: Path) -> dict[tuple[int, str], LoraFactors]:
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        if "lora_magnitude_vector" in key:
            raise FusionError(f"{path}: tensor {key} is a DoRA magnitude; DoRA adapters are not supported")
        match = _LORA_KEY.search(key)
        if match is None:
            if "lora_" in key:
                raise FusionError(
                    f"{path}: tensor {key} is not a LoRA weight of a decoder-layer "
                    "projection (expected ...layers.N.self_attn|mlp.X_proj.lora_A|B.weight)"
                )
            continue  # e.g. a saved bias or head; ignored like peft's modules_to_save
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 2:
            raise FusionError(f"{path}: tensor {key} must be 2-D, got shape {tuple(getattr(tensor, 'shape', ()))}")
        if not tensor.is_floating_point():
            raise FusionError(f"{path}: tensor {key} has dtype {tensor.dtype}; a float type was expected")
        slot = (int(match["layer"]), match["module"])
        halves.setdefault(slot, {})[match["ab"]] = tensor
    if not halves:
        raise FusionError(
            f"{path}: no LoRA tensors found (expected keys like "
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight)"
        )
    factors = {}
    for (layer, module), pair in sorted(halves.items()):
        where = f"layers.{layer}.{module}"
        full_name = f"model.layers.{layer}.{'self_attn' if module in ATTENTION_MODULES else 'mlp'}.{module}"
        if "A" not in pair or "B" not in pair:
            missing = "lora_B" if "A" in pair else "lora_A"
            raise FusionError(f"{path}: {where} has no {missing} tensor")
        A, B = pair["A"], pair["B"]
        if A.shape[0] != B.shape[1]:
            raise FusionError(
                f"{path}: {where} lora_A has rank {A.shape[0]} but lora_B has rank {B.shape[1]}; they must match"
            )
        if A.shape[0] > _MAX_RANK or A.shape[0] < 1:
            raise FusionError(f"{path}: {where} rank {A.shape[0]} is outside 1..{_MAX_RANK}")
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise FusionError(f"{path}: {where} contains NaN or Inf values")
        factors[(layer, module)] = LoraFactors(A.float(), B.float(), _scale(config, full_name, A.shape[0], path))
    return factors


def check_targets(targets, modules: set[str], config_path) -> None:
    """adapter_config.json's target_modules must describe the tensors: a config written for another
    architecture (e.g. query_key_value, dense) over Llama-named tensors means a mixed-up folder.

    `modules` are the full names the tensors adapt ("model.layers.0.self_attn.q_proj"); a list
    entry names a module by its last parts, a string is a regular expression over the full name
    (or "all-linear"), as in peft.
    """
    if targets is None or targets == "all-linear":
        return
    if isinstance(targets, str):
        missed = sorted(m for m in modules if re.fullmatch(targets, m) is None)
        shown = targets
    elif isinstance(targets, list) and all(isinstance(t, str) for t in targets):
        missed = sorted(m for m in modules if not any(m == t or m.endswith("." + t) for t in targets))
        shown = ", ".join(targets)
    else:
        raise FusionError(f"{config_path}: target_modules must be a list of module names or a pattern, got {targets!r}")
    if missed:
        raise FusionError(
            f"{config_path}: target_modules ({shown}) do not name {missed[0].rsplit('.', 1)[-1]}, "
            "which the weights adapt; the config does not describe these tensors"
        )


def validate_against(factors: dict[tuple[int, str], LoraFactors], model, path: str) -> None:
    """Check every tensor fits the base model; raise one sentence naming the first misfit."""
    layers = model.model.layers
    for (layer, module), f in factors.items():
        if layer >= len(layers):
            raise FusionError(
                f"{path}: layers.{layer}.{module} refers to layer {layer}, but the base model has {len(layers)} layers"
            )
        block = layers[layer].self_attn if module in ATTENTION_MODULES else layers[layer].mlp
        linear = getattr(block, module, None)
        if linear is None or module not in ALL_MODULES:
            raise FusionError(f"{path}: layers.{layer}.{module} is not a projection of the base model")
        if f.A.shape[1] != linear.in_features:
            raise FusionError(
                f"{path}: layers.{layer}.{module}.lora_A has shape {tuple(f.A.shape)}; "
                f"expected ({f.rank}, {linear.in_features}) for this base model"
            )
        if f.B.shape[0] != linear.out_features:
            raise FusionError(
                f"{path}: layers.{layer}.{module}.lora_B has shape {tuple(f.B.shape)}; "
                f"expected ({linear.out_features}, {f.rank}) for this base model"
            )


def load_lora(path: str | Path, name: str | None = None, model=None) -> LoraAdapter:
    """Load a peft LoRA folder. `model` (the base model) enables shape validation."""
    folder = Path(path)
    if not folder.is_dir():
        raise FusionError(f"adapter folder {folder} does not exist")
    config = read_json(folder / "adapter_config.json")
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise FusionError(f"{folder}: adapter_config.json has peft_type {peft_type!r}; a LORA adapter was expected")
    if "r" in config and not (isinstance(config["r"], int) and 0 < config["r"] <= _MAX_RANK):
        raise FusionError(
            f"{folder}: adapter_config.json declares rank r={config['r']!r}; expected an integer in 1..{_MAX_RANK}"
        )
    weights = find_weights_file(folder)
    state = load_tensor_file(weights)
    factors = parse_lora_state(state, config, weights)
    adapted = {f"model.layers.{layer}.{'self_attn' if m in ATTENTION_MODULES else 'mlp'}.{m}" for layer, m in factors}
    check_targets(config.get("target_modules"), adapted, folder / "adapter_config.json")
    if model is not None:
        validate_against(factors, model, str(weights))
    studio = read_json(folder / "studio.json") if (folder / "studio.json").is_file() else {}
    name = name or folder.name
    ranks = {f.rank for f in factors.values()}
    return LoraAdapter(
        name=name,
        factors=factors,
        role=infer_role(name, studio.get("role")),
        rank=max(ranks),
        alpha=float(config.get("lora_alpha", PEFT_DEFAULT_ALPHA)),
        targets=tuple(m for m in ALL_MODULES if any(k[1] == m for k in factors)),
        base_model=str(config.get("base_model_name_or_path") or ""),
        path=str(folder),
        description=str(studio.get("description", "")),
        size_bytes=weights.stat().st_size,
        meta=studio,
    )
