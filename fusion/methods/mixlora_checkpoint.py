"""MixLoRA checkpoints in the reference package's format (`mixlora` 0.2.3 on PyPI).

adapter_config.json: peft_type "MIXLORA", r, lora_alpha, lora_dropout, target_modules,
routing_strategy "mixlora", num_experts, top_k, optional act_fn (and use_rslora). Weights keyed
    mixlora.layers.{i}.self_attn.{q,k,v,o}_proj.lora_{A,B}.weight          plain attention LoRAs
    mixlora.layers.{i}.mlp.moe_gate.weight                                 router (E, d)
    mixlora.layers.{i}.mlp.{gate,up,down}_proj.experts.{e}.lora_{A,B}.weight  expert LoRAs
Every LoRA (attention and expert) is scaled alpha / r (alpha / sqrt(r) with use_rslora). The
package reads only adapter_model.bin; we read that (weights-only) or adapter_model.safetensors.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers.activations import ACT2FN

from ..adapters import ALL_MODULES, ATTENTION_MODULES, MLP_MODULES, LoraFactors, find_weights_file, infer_role
from ..errors import FusionError
from ..safe_io import load_tensor_file, read_json

MAX_EXPERTS = 256
_MAX_RANK = 4096
_KEY = re.compile(
    r"^mixlora\.layers\.(?P<layer>\d+)\.(?:mlp\.moe_gate\.weight|(?:self_attn|mlp)\."
    r"(?P<module>[a-z_]+_proj)\.(?:experts\.(?P<expert>\d+)\.)?lora_[AB]\.weight)$"
)


def activation(name: str):
    return ACT2FN[name]


@dataclass
class MixLoraConfig:
    """The fields of a MixLoRA adapter_config.json that decide what the adapter computes."""

    r: int = field(default=8, metadata={"help": "LoRA rank of every attention LoRA and expert LoRA."})
    lora_alpha: float = field(default=16, metadata={"help": "LoRA scale numerator: scale = alpha / r."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on LoRA inputs while training."})
    target_modules: tuple[str, ...] = field(
        default=ALL_MODULES,
        metadata={"help": "Attention projections get plain LoRAs; FFN projections get one LoRA per expert."},
    )
    num_experts: int = field(default=8, metadata={"help": "Experts (and router outputs) per layer."})
    top_k: int = field(default=2, metadata={"help": "Experts each token is routed to."})
    act_fn: str | None = field(
        default=None, metadata={"help": "FFN activation by transformers name; None = the base model's own."}
    )
    use_rslora: bool = field(default=False, metadata={"help": "Scale alpha / sqrt(r) instead of alpha / r."})
    router_aux_loss_coef: float = field(default=0.01, metadata={"help": "Weight of the load-balance loss."})
    router_init_range: float = field(default=0.02, metadata={"help": "Std of the router's normal init."})
    jitter_noise: float = field(default=0.0, metadata={"help": "Router input noise (training only here)."})
    lora_init: str = field(
        default="original",
        metadata={"help": "'original': A kaiming-uniform(a=sqrt(5)); 'gaussian': A ~ N(0, 1/r). B starts at zero."},
    )
    base_model: str = field(default="", metadata={"help": "base_model_name_or_path of the checkpoint."})

    @property
    def scale(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    @property
    def attention_targets(self) -> tuple[str, ...]:
        return tuple(m for m in ATTENTION_MODULES if m in self.target_modules)

    @property
    def expert_targets(self) -> tuple[str, ...]:
        return tuple(m for m in MLP_MODULES if m in self.target_modules)

    @classmethod
    def from_json(cls, config: dict, path: Path) -> MixLoraConfig:
        """Validate like the reference's MixLoraConfig.check(), one sentence per problem."""

        def need_int(key, low, high, default=None):
            value = config.get(key, default)
            if value is None:
                raise FusionError(f"{path} has no {key!r}; a MixLoRA config needs it (an integer in {low}..{high})")
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise FusionError(f"{path}: {key!r} is {value!r}; expected an integer in {low}..{high}")
            return value

        peft_type = str(config.get("peft_type", "")).upper()
        if peft_type != "MIXLORA":
            raise FusionError(f"{path} has peft_type {config.get('peft_type')!r}; 'MIXLORA' was expected")
        strategy = config.get("routing_strategy", "mixlora")
        if strategy != "mixlora":
            raise FusionError(
                f"{path}: routing_strategy {strategy!r} is not supported; only 'mixlora' (top-k routing) is"
            )
        if config.get("use_dora"):
            raise FusionError(f"{path} asks for DoRA experts (use_dora), which are not supported")
        num_experts = need_int("num_experts", 1, MAX_EXPERTS)
        top_k = need_int("top_k", 1, num_experts, default=2)  # the reference's default is 2
        r = need_int("r", 1, _MAX_RANK)
        alpha = config.get("lora_alpha", r)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
            raise FusionError(f"{path}: 'lora_alpha' is {alpha!r}; expected a positive number")
        targets = config.get("target_modules")
        if isinstance(targets, dict):
            targets = [name for name, on in targets.items() if on]
        if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
            raise FusionError(
                f"{path}: 'target_modules' must be a list of projection names like "
                "['q_proj', 'gate_proj'], got {targets!r}"
            )
        unknown = [t for t in targets if t not in ALL_MODULES]
        if unknown:  # a config for another architecture: its tensors would be silently ignored
            raise FusionError(
                f"{path}: target_modules name {', '.join(unknown)}, which are not projections "
                f"of a decoder layer ({', '.join(ALL_MODULES)})"
            )
        act_fn = config.get("act_fn")
        if act_fn is not None:
            if not isinstance(act_fn, str) or act_fn not in ACT2FN:
                raise FusionError(
                    f"{path}: act_fn {act_fn!r} is not a transformers activation name (e.g. 'silu', 'gelu')"
                )
        expert = config.get("expert_lora") or {}
        for key in ("r", "lora_alpha", "use_rslora"):
            if key in expert and expert[key] != config.get(key, expert[key]):
                raise FusionError(
                    f"{path}: expert_lora sets {key}={expert[key]!r} unlike the top level "
                    f"({config.get(key)!r}); the reference package ignores expert_lora, so "
                    "this checkpoint is ambiguous"
                )
        return cls(
            r=r,
            lora_alpha=alpha,
            lora_dropout=float(config.get("lora_dropout") or 0.0),
            target_modules=tuple(m for m in ALL_MODULES if m in targets),
            num_experts=num_experts,
            top_k=top_k,
            act_fn=act_fn,
            use_rslora=bool(config.get("use_rslora", False)),
            router_aux_loss_coef=float(config.get("router_aux_loss_coef", 0.001)),
            router_init_range=float(config.get("router_init_range", 0.02)),
            jitter_noise=float(config.get("jitter_noise", 0.0)),
            lora_init=str(config.get("lora_init", "original")),
            base_model=str(config.get("base_model_name_or_path") or ""),
        )

    def to_json(self) -> dict:
        """The fields the reference package's MixLoraConfig.export() writes, in its order."""
        config = {
            "bias": "none",
            "peft_type": "MIXLORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": self.base_model,
        }
        if self.use_rslora:
            config["use_rslora"] = True
        config.update(
            {
                "r": self.r,
                "lora_alpha": self.lora_alpha,
                "lora_dropout": self.lora_dropout,
                "target_modules": list(self.target_modules),
                "routing_strategy": "mixlora",
                "num_experts": self.num_experts,
            }
        )
        if self.act_fn:
            config["act_fn"] = self.act_fn
        config.update(
            {
                "top_k": self.top_k,
                "router_aux_loss_coef": self.router_aux_loss_coef,
                "router_init_range": self.router_init_range,
                "jitter_noise": self.jitter_noise,
            }
        )
        if self.lora_init != "original":
            config["lora_init"] = self.lora_init
        return config


@dataclass
class ExpertFactors:
    """One FFN projection's LoRA for every expert of a layer: delta_e(x) = scale * B[e] @ A[e] @ x."""

    A: torch.Tensor  # (E, r, d_in)
    B: torch.Tensor  # (E, d_out, r)
    scale: float


@dataclass
class MixLoraAdapter:
    name: str
    config: MixLoraConfig
    routers: list[torch.Tensor]  # per layer (E, d), kept in fp32
    attention: dict[tuple[int, str], LoraFactors]
    experts: dict[tuple[int, str], ExpertFactors]
    role: str = "other"
    path: str = ""
    description: str = ""
    size_bytes: int = 0
    meta: dict = field(default_factory=dict)

    kind = "mixlora"

    @property
    def num_experts(self) -> int:
        return self.config.num_experts

    @property
    def top_k(self) -> int:
        return self.config.top_k

    def summary(self) -> dict:
        c = self.config
        return {
            "name": self.name,
            "kind": self.kind,
            "role": self.role,
            "rank": c.r,
            "alpha": c.lora_alpha,
            "targets": list(c.target_modules),
            "base_model": c.base_model,
            "size_bytes": self.size_bytes,
            "description": self.description,
            "path": self.path,
            "num_experts": c.num_experts,
            "top_k": c.top_k,
            "act_fn": c.act_fn,
        }

    def to(self, device, dtype) -> MixLoraAdapter:
        self.routers = [r.to(device=device, dtype=torch.float32) for r in self.routers]
        for f in list(self.attention.values()) + list(self.experts.values()):
            f.A = f.A.to(device=device, dtype=dtype)
            f.B = f.B.to(device=device, dtype=dtype)
        return self

    def tensors(self) -> list[torch.Tensor]:
        """Every trainable tensor, in a fixed order."""
        out = list(self.routers)
        for f in list(self.attention.values()) + list(self.experts.values()):
            out += [f.A, f.B]
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors under the reference package's key names (fp32, CPU, unshared storage)."""

        def plain(t):
            return t.detach().float().cpu().clone().contiguous()

        state = {}
        for layer, router in enumerate(self.routers):
            state[f"mixlora.layers.{layer}.mlp.moe_gate.weight"] = plain(router)
        for (layer, module), f in self.attention.items():
            prefix = f"mixlora.layers.{layer}.self_attn.{module}"
            state[f"{prefix}.lora_A.weight"], state[f"{prefix}.lora_B.weight"] = plain(f.A), plain(f.B)
        for (layer, module), f in self.experts.items():
            for e in range(f.A.shape[0]):
                prefix = f"mixlora.layers.{layer}.mlp.{module}.experts.{e}"
                state[f"{prefix}.lora_A.weight"] = plain(f.A[e])
                state[f"{prefix}.lora_B.weight"] = plain(f.B[e])
        return state


def save_mixlora(adapter: MixLoraAdapter, folder: Path) -> None:
    """Write adapter_config.json + adapter_model.bin as the reference package reads them
    (it only reads the .bin pickle, with torch.load(weights_only=True))."""
    folder = Path(folder)
    config = json.dumps(adapter.config.to_json(), indent=2)
    (folder / "adapter_config.json").write_text(config, encoding="utf-8")
    torch.save(adapter.state_dict(), str(folder / "adapter_model.bin"))


def linear_shape(model, layer: int, module: str) -> tuple[int, int] | None:
    if model is None:
        return None
    decoder = model.model.layers[layer]
    linear = getattr(decoder.self_attn if module in ATTENTION_MODULES else decoder.mlp, module, None)
    if linear is None:
        raise FusionError(f"layer {layer} of the base model has no {module}, which the MixLoRA target_modules name")
    return linear.in_features, linear.out_features


def _take(state: dict, key: str, shape: tuple[int | None, ...], path: Path) -> torch.Tensor:
    """Pop one tensor and check it is a finite float tensor of `shape` (None: any size)."""
    tensor = state.pop(key, None)
    wanted = "(" + ", ".join("?" if s is None else str(s) for s in shape) + ")"
    if tensor is None:
        raise FusionError(f"{path}: tensor {key} is missing (expected shape {wanted})")
    if tensor.dim() != len(shape) or any(s is not None and s != t for s, t in zip(shape, tensor.shape)):
        raise FusionError(f"{path}: tensor {key} has shape {tuple(tensor.shape)}; expected {wanted}")
    if not tensor.is_floating_point():
        raise FusionError(f"{path}: tensor {key} has dtype {tensor.dtype}; a float type was expected")
    if not torch.isfinite(tensor).all():
        raise FusionError(f"{path}: tensor {key} contains NaN or Inf values")
    return tensor.float()


def parse_mixlora_state(state: dict[str, torch.Tensor], config: MixLoraConfig, path: Path, model=None):
    """-> (routers, attention LoRAs, expert LoRAs), checked against the config and the base model."""
    state = {k: v for k, v in state.items() if k.startswith("mixlora.")}
    if not state:
        raise FusionError(f"{path}: no MixLoRA tensors found (expected keys like mixlora.layers.0.mlp.moe_gate.weight)")
    for key in state:
        match = _KEY.match(key)
        if match is None:
            raise FusionError(f"{path}: tensor {key} is not a MixLoRA router or LoRA weight")
    layers = [int(_KEY.match(k)["layer"]) for k in state]
    num_layers = model.config.num_hidden_layers if model is not None else max(layers) + 1
    if max(layers) >= num_layers:
        raise FusionError(
            f"{path}: tensors for layer {max(layers)} were found, but the base model has {num_layers} layers"
        )
    experts_found = [int(m["expert"]) for m in map(_KEY.match, state) if m["expert"] is not None]
    if experts_found and max(experts_found) >= config.num_experts:
        raise FusionError(
            f"{path}: tensors for expert {max(experts_found)} were found, but num_experts is {config.num_experts}"
        )
    hidden = model.config.hidden_size if model is not None else None
    r, E = config.r, config.num_experts
    routers, attention, experts = [], {}, {}
    for layer in range(num_layers):
        routers.append(_take(state, f"mixlora.layers.{layer}.mlp.moe_gate.weight", (E, hidden), path))
        for module in config.attention_targets:
            d_in, d_out = linear_shape(model, layer, module) or (None, None)
            prefix = f"mixlora.layers.{layer}.self_attn.{module}"
            A = _take(state, f"{prefix}.lora_A.weight", (r, d_in), path)
            B = _take(state, f"{prefix}.lora_B.weight", (d_out, r), path)
            attention[(layer, module)] = LoraFactors(A, B, config.scale)
        for module in config.expert_targets:
            d_in, d_out = linear_shape(model, layer, module) or (None, None)
            As, Bs = [], []
            for e in range(E):
                prefix = f"mixlora.layers.{layer}.mlp.{module}.experts.{e}"
                As.append(_take(state, f"{prefix}.lora_A.weight", (r, d_in), path))
                Bs.append(_take(state, f"{prefix}.lora_B.weight", (d_out, r), path))
            experts[(layer, module)] = ExpertFactors(torch.stack(As), torch.stack(Bs), config.scale)
    # What is left targets modules outside target_modules: the reference ignores it too.
    return routers, attention, experts


def load_mixlora(folder: str | Path, name: str | None = None, model=None) -> MixLoraAdapter:
    """Load a MixLoRA folder (adapter_model.safetensors or .bin). `model` enables shape checks."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FusionError(f"adapter folder {folder} does not exist")
    config = MixLoraConfig.from_json(read_json(folder / "adapter_config.json"), folder / "adapter_config.json")
    weights = find_weights_file(folder)
    routers, attention, experts = parse_mixlora_state(load_tensor_file(weights), config, weights, model)
    studio = read_json(folder / "studio.json") if (folder / "studio.json").is_file() else {}
    name = name or folder.name
    return MixLoraAdapter(
        name=name,
        config=config,
        routers=routers,
        attention=attention,
        experts=experts,
        role=infer_role(name, studio.get("role")),
        path=str(folder),
        description=str(studio.get("description", "")),
        size_bytes=weights.stat().st_size,
        meta=studio,
    )
