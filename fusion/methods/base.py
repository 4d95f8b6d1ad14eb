"""The interface every fusion method implements, and its declared parameters."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..adapters import ALL_MODULES, LoraAdapter
from ..errors import FusionError
from ..runtime import FusionPlan, LowRankDelta


@dataclass(frozen=True)
class Param:
    """One parameter of a method; the UI and CLI build their controls from this."""

    name: str
    type: str  # float | int | bool | choice | floats | text | artifact
    default: Any = None
    help: str = ""
    min: float | None = None
    max: float | None = None
    choices: tuple = ()
    fit_only: bool = False  # only meaningful when fitting (e.g. a new adapter's shape); hidden for chat

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "type": self.type,
            "default": self.default,
            "help": self.help,
            "min": self.min,
            "max": self.max,
            "choices": list(self.choices),
            "fit_only": self.fit_only,
        }

    def coerce(self, value: Any, method: str) -> Any:
        where = f"parameter {self.name!r} of method {method!r}"
        if value is None or (isinstance(value, str) and value.strip() == "" and self.type != "text"):
            return self.default
        try:
            if self.type == "float":
                value = float(value)
                if not math.isfinite(value):
                    raise ValueError
            elif self.type == "int":
                if isinstance(value, float) and not value.is_integer():
                    raise ValueError
                value = int(value)
            elif self.type == "bool":
                if isinstance(value, str):
                    if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                        raise ValueError
                    value = value.lower() in ("true", "1", "yes")
                value = bool(value)
            elif self.type == "floats":
                if isinstance(value, str):
                    value = [v for v in value.replace(";", ",").split(",") if v.strip()]
                value = [float(v) for v in value]
                if not all(math.isfinite(v) for v in value):
                    raise ValueError
            elif self.type in ("choice", "text", "artifact"):
                value = str(value)
        except (TypeError, ValueError):
            raise FusionError(f"{where} must be of type {self.type}, got {value!r}") from None
        if self.type == "choice" and value not in self.choices:
            raise FusionError(f"{where} must be one of {', '.join(map(str, self.choices))}, got {value!r}")
        numbers = value if self.type == "floats" else [value] if self.type in ("float", "int") else []
        for number in numbers:
            if (self.min is not None and number < self.min) or (self.max is not None and number > self.max):
                raise FusionError(f"{where} must lie in [{self.min}, {self.max}], got {number}")
        return value


@dataclass
class BuildContext:
    """What a method may use to build a plan: the base model and the library."""

    model: torch.nn.Module
    device: torch.device
    dtype: torch.dtype
    resolve_artifact: Callable[[str], Any] | None = None

    @property
    def num_layers(self) -> int:
        return self.model.config.num_hidden_layers

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size


@dataclass
class FitResult:
    """What a method's fit learned."""

    losses: list[float] = field(default_factory=list)  # one per training step (or search step)
    params: dict = field(default_factory=dict)  # fitted parameter values, e.g. LoraHub's weights
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # saved with the fitted fusion
    meta: dict = field(default_factory=dict)
    param_ref: str | None = None  # the parameter that points a request at the saved tensors
    save_adapter: Callable[[Path], None] | None = None  # methods that fit from scratch: writes the new adapter


class FusionMethod:
    """Base class. Subclasses set the class attributes and implement `build`."""

    name: str = ""
    pretty_name: str = ""
    kind: str = "static"  # static | dynamic
    reference_url: str = ""
    description: str = ""
    params: tuple[Param, ...] = ()
    min_adapters: int = 1
    max_adapters: int | None = None
    fittable: bool = False
    fit_from_scratch: bool = False  # fit trains a new adapter instead of weighting chosen ones
    adapter_kind: str = "lora"  # lora | mixlora

    def describe(self) -> dict:
        return {
            "name": self.name,
            "pretty_name": self.pretty_name,
            "kind": self.kind,
            "reference_url": self.reference_url,
            "description": self.description,
            "params": [p.to_dict() for p in self.params],
            "min_adapters": self.min_adapters,
            "max_adapters": self.max_adapters,
            "fittable": self.fittable,
            "fit_from_scratch": self.fit_from_scratch,
            "adapter_kind": self.adapter_kind,
        }

    def validate(self, adapters: list, params: dict | None) -> dict:
        """Check adapter count and coerce params; unknown params are an error."""
        params = dict(params or {})
        n = len(adapters)
        if n < self.min_adapters or (self.max_adapters is not None and n > self.max_adapters):
            wanted = (
                f"exactly {self.min_adapters}"
                if self.min_adapters == self.max_adapters
                else f"at least {self.min_adapters}"
                if self.max_adapters is None
                else f"{self.min_adapters} to {self.max_adapters}"
            )
            raise FusionError(f"method {self.name!r} takes {wanted} adapter(s), got {n}")
        kinds = {getattr(a, "kind", "lora") for a in adapters}
        if adapters and kinds != {self.adapter_kind}:
            raise FusionError(
                f"method {self.name!r} needs {self.adapter_kind} adapters, got "
                f"{', '.join(f'{a.name} ({a.kind})' for a in adapters)}"
            )
        return self.coerce_params(params)

    def coerce_params(self, params: dict | None) -> dict:
        params = dict(params or {})
        known = {p.name: p for p in self.params}
        unknown = sorted(set(params) - set(known))
        if unknown:
            raise FusionError(
                f"method {self.name!r} has no parameter {unknown[0]!r}; it takes: {', '.join(known) or 'none'}"
            )
        return {name: p.coerce(params.get(name), self.name) for name, p in known.items()}

    def build(self, ctx: BuildContext, adapters: list, params: dict) -> FusionPlan:
        raise NotImplementedError

    def fit(
        self, ctx: BuildContext, adapters: list, examples, params: dict, options: dict, on_progress=None, cancel=None
    ) -> FitResult:
        raise FusionError(f"method {self.name!r} has nothing to fit")


def slot_weights_param(default_help: str) -> Param:
    return Param("weights", "floats", None, default_help, min=-10.0, max=10.0)


def resolve_weights(weights: list[float] | None, k: int, default: float | None, method: str) -> list[float]:
    if weights is None:
        return [default if default is not None else 1.0 / k] * k
    if len(weights) != k:
        raise FusionError(f"method {method!r} got {len(weights)} weights for {k} adapters; give one weight per adapter")
    return list(weights)


def module_keys(adapters: list[LoraAdapter]) -> list[tuple[int, str]]:
    """Every (layer, module) that at least one adapter targets, in model order."""
    keys = set()
    for adapter in adapters:
        keys.update(adapter.factors)
    order = {m: i for i, m in enumerate(ALL_MODULES)}
    return sorted(keys, key=lambda key: (key[0], order[key[1]]))


def stacked_delta(
    ctx: BuildContext,
    adapters: list[LoraAdapter],
    key: tuple[int, str],
    slot_coef: list[float] | torch.Tensor | None,
    dynamic: bool,
    keep_coef: bool = False,
) -> LowRankDelta | None:
    """Concatenate the slots' factors of one module: A = [A_1; ...; A_k], B = [B_1 ... B_k].

    Each rank block of slot i is scaled by s_i * slot_coef[i]. With `dynamic`, the delta also
    records which slot each rank belongs to so a per-token weight can scale it at run time.
    With `keep_coef`, the coefficient stays a separate (differentiable) vector instead of
    being folded into B.
    """
    As, Bs, coefs, slots, parts = [], [], [], [], []
    for slot, adapter in enumerate(adapters):
        factors = adapter.factors.get(key)
        if factors is None:
            continue
        c = factors.scale if slot_coef is None else slot_coef[slot] * factors.scale
        As.append(factors.A)
        Bs.append(factors.B)
        coefs.append(c if isinstance(c, torch.Tensor) else torch.tensor(float(c)))
        slots.append(torch.full((factors.rank,), slot, dtype=torch.long))
        parts.append((factors, c, slot))
    if not As:
        return None
    A = torch.cat(As, 0).to(ctx.device, ctx.dtype)  # (R, d_in)
    B = torch.cat(Bs, 1).to(ctx.device, ctx.dtype)  # (d_out, R)
    coef = torch.cat([c.reshape(1).expand(a.shape[0]) for c, a in zip(coefs, As)]).to(ctx.device, ctx.dtype)
    slot_of_rank = torch.cat(slots).to(ctx.device) if dynamic else None
    if keep_coef:
        return LowRankDelta(A, B, slot_of_rank, coef)
    return LowRankDelta(A, B * coef, slot_of_rank, None, tuple(parts))
