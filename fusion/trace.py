"""Trace: what a fusion did, per token, per layer, per slot (LoRA or expert)."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import FusionError
from .runtime import Run
from .safe_io import atomic_write_text, read_json


@dataclass
class Trace:
    """weights: (tokens, layers, slots).

    kind "gate": LoRA-Flow's raw per-token weights (may fall outside [0, 1]);
    kind "router": MixLoRA router probabilities, with `chosen` (tokens, layers, top_k);
    kind "static": the method's fixed per-layer weights repeated over tokens.
    """

    weights: torch.Tensor
    tokens: list[str]
    slot_names: list[str]
    kind: str
    method: str
    prompt_tokens: int = 0
    chosen: torch.Tensor | None = None
    module_weights: dict[str, torch.Tensor] | None = None  # static: module -> (layers, slots)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.weights.shape)

    def to_dict(self) -> dict:
        data = {
            "method": self.method,
            "kind": self.kind,
            "shape": list(self.shape),
            "slot_names": self.slot_names,
            "tokens": self.tokens,
            "prompt_tokens": self.prompt_tokens,
            "weights": self.weights.tolist(),
        }
        if self.chosen is not None:
            data["chosen"] = self.chosen.tolist()
        if self.module_weights:
            data["module_weights"] = {k: v.tolist() for k, v in self.module_weights.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Trace:
        try:
            weights = torch.tensor(data["weights"], dtype=torch.float32)
            if weights.dim() != 3:
                raise FusionError(f"trace weights must be 3-D (tokens, layers, slots), got {weights.dim()}-D")
            chosen = torch.tensor(data["chosen"], dtype=torch.long) if data.get("chosen") else None
            modules = {k: torch.tensor(v) for k, v in (data.get("module_weights") or {}).items()}
            return cls(
                weights=weights,
                tokens=list(data["tokens"]),
                slot_names=list(data["slot_names"]),
                kind=data["kind"],
                method=data["method"],
                prompt_tokens=int(data.get("prompt_tokens", 0)),
                chosen=chosen,
                module_weights=modules or None,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise FusionError(f"not a trace: {exc}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    def to_csv(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out)
        header = ["token_index", "token", "is_prompt", "layer"] + list(self.slot_names)
        if self.chosen is not None:
            header.append("chosen")
        writer.writerow(header)
        for t, token in enumerate(self.tokens):
            for layer in range(self.weights.shape[1]):
                row = [t, token, int(t < self.prompt_tokens), layer]
                row += [f"{v:.6g}" for v in self.weights[t, layer].tolist()]
                if self.chosen is not None:
                    row.append(" ".join(str(i) for i in self.chosen[t, layer].tolist()))
                writer.writerow(row)
        return out.getvalue()

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        atomic_write_text(path, self.to_csv() if path.suffix == ".csv" else self.to_json())
        return path

    @classmethod
    def load(cls, path: str | Path) -> Trace:
        return cls.from_dict(read_json(path))


def build_trace(run: Run, tokens: list[str], prompt_tokens: int, num_layers: int) -> Trace:
    """Assemble the trace of a finished run from what its forwards recorded."""
    plan = run.plan
    n = len(tokens)
    k = len(plan.slot_names)
    if plan.trace_kind == "gate" and run.steps:
        per_step = [torch.stack([step[l] for l in range(num_layers)], dim=1) for step in run.steps]
        weights = torch.cat(per_step, dim=0)[:n]  # (tokens, layers, k)
        return Trace(weights, tokens, plan.slot_names, "gate", plan.method, prompt_tokens)
    if plan.trace_kind == "router" and run.router_steps:
        layers = sorted(run.router_steps[0])
        probs = torch.cat([torch.stack([s[l][0] for l in layers], 1) for s in run.router_steps], 0)[:n]
        chosen = torch.cat([torch.stack([s[l][1] for l in layers], 1) for s in run.router_steps], 0)[:n]
        return Trace(probs, tokens, plan.slot_names, "router", plan.method, prompt_tokens, chosen=chosen)
    static = plan.static_weights if plan.static_weights is not None else torch.zeros(num_layers, k)
    weights = static.float().unsqueeze(0).expand(n, -1, -1).clone()  # (tokens, layers, k)
    return Trace(
        weights, tokens, plan.slot_names, "static", plan.method, prompt_tokens, module_weights=plan.module_weights
    )
