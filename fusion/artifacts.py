"""Fitted fusions saved to disk: `fusion.json` (method, adapters, params, metadata) plus
`tensors.safetensors` (gates, logits). Written atomically; never overwritten by accident."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import safetensors.torch
import torch

from .errors import FusionError
from .safe_io import atomic_folder, load_tensor_file, read_json

FORMAT_VERSION = 1


@dataclass
class FusionArtifact:
    name: str
    method: str
    adapters: list[str]
    params: dict = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    path: str = ""

    def summary(self) -> dict:
        return {
            "name": self.name,
            "method": self.method,
            "adapters": self.adapters,
            "params": self.params,
            "meta": self.meta,
            "path": self.path,
        }


def save_artifact(artifact: FusionArtifact, folder: str | Path, overwrite: bool = False) -> Path:
    folder = Path(folder)
    with atomic_folder(folder, overwrite=overwrite) as tmp:
        doc = {
            "format": FORMAT_VERSION,
            "name": artifact.name,
            "method": artifact.method,
            "adapters": artifact.adapters,
            "params": artifact.params,
            "meta": artifact.meta,
        }
        (tmp / "fusion.json").write_text(json.dumps(doc, indent=2), encoding="utf-8")
        if artifact.tensors:
            # looked up on the module at call time, so a test can interrupt a save midway
            safetensors.torch.save_file(
                {k: v.detach().float().contiguous().cpu() for k, v in artifact.tensors.items()},
                str(tmp / "tensors.safetensors"),
            )
    artifact.path = str(folder)
    return folder


def load_artifact(folder: str | Path) -> FusionArtifact:
    folder = Path(folder)
    doc = read_json(folder / "fusion.json")
    for key in ("method", "adapters"):
        if key not in doc:
            raise FusionError(f"{folder / 'fusion.json'} has no {key!r} field")
    if not isinstance(doc["adapters"], list) or not all(isinstance(a, str) for a in doc["adapters"]):
        raise FusionError(f"{folder / 'fusion.json'}: 'adapters' must be a list of adapter names")
    tensors = {}
    if (folder / "tensors.safetensors").is_file():
        tensors = load_tensor_file(folder / "tensors.safetensors")
    return FusionArtifact(
        name=str(doc.get("name") or folder.name),
        method=str(doc["method"]),
        adapters=list(doc["adapters"]),
        params=dict(doc.get("params") or {}),
        tensors=tensors,
        meta=dict(doc.get("meta") or {}),
        path=str(folder),
    )
