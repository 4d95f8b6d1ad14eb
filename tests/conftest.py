"""Shared fixtures: a tiny random Llama, a library of LoRA folders on disk, an engine over them.

`Engine` patches its model's forward in place, so every studio keeps a `pristine` deep copy
taken before the engine exists; references are always built from that copy.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from fixtures_formats import tiny_tokenizer
from helpers import MODULES, TEST_SEED, lora_state, tiny_model, write_lora

# Tiny models gain nothing from intra-op threads, and on a busy machine idle-spinning
# worker threads cost several times the actual work. LORA_STUDIO_TEST_THREADS changes it, to
# measure how a numeric test's figures move with the thread count (docs/testing.md).
torch.set_num_threads(int(os.environ.get("LORA_STUDIO_TEST_THREADS", "1")))

LAYERS = 3
HIDDEN = 32


@pytest.fixture()
def figures(request) -> dict:
    """A numeric test puts the figures it asserts on here; with LORA_STUDIO_FIGURES=FILE set they
    are appended to FILE as one JSON line per test (also when the test fails)."""
    recorded: dict = {}
    yield recorded
    path = os.environ.get("LORA_STUDIO_FIGURES")
    if path and recorded:
        row = {
            "test": request.node.nodeid,
            "seed": TEST_SEED,
            "threads": torch.get_num_threads(),
            "capability": torch.backends.cpu.get_cpu_capability(),
            **recorded,
        }
        with open(path, "a", encoding="utf-8") as out:
            out.write(json.dumps(row) + "\n")


@dataclass(frozen=True)
class LoraSpec:
    name: str
    rank: int
    alpha: float
    seed: int
    modules: tuple[str, ...] = MODULES

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


# Three LoRAs of rank 4 (task-c with another alpha and only some modules) and one of rank 8.
SPECS = {
    s.name: s
    for s in (
        LoraSpec("lang-a", 4, 8.0, 11),
        LoraSpec("task-b", 4, 8.0, 12),
        LoraSpec("task-c", 4, 16.0, 13, ("q_proj", "v_proj", "up_proj", "down_proj")),
        LoraSpec("wide-d", 8, 8.0, 14),
    )
}


@dataclass
class Studio:
    engine: object
    pristine: torch.nn.Module  # untouched copy of the engine's base model
    tokenizer: object
    root: Path
    folders: dict[str, Path] = field(default_factory=dict)
    states: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    def scale(self, name: str) -> float:
        return SPECS[name].scale

    def ids(self, batch: int = 2, length: int = 9, seed: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randint(3, len(self.tokenizer), (batch, length), generator=g)


def build_studio(root: Path, specs=tuple(SPECS.values())) -> Studio:
    from fusion.engine import Engine
    from fusion.model import BaseModel

    tokenizer = tiny_tokenizer()
    model = tiny_model(seed=3, layers=LAYERS, hidden=HIDDEN, vocab=len(tokenizer))
    model.config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    pristine = copy.deepcopy(model)
    studio = Studio(None, pristine, tokenizer, root)
    for spec in specs:
        state = lora_state(model, rank=spec.rank, seed=spec.seed, modules=spec.modules)
        studio.folders[spec.name] = write_lora(
            root / "adapters" / spec.name, model, rank=spec.rank, alpha=spec.alpha, modules=spec.modules, state=state
        )
        studio.states[spec.name] = state
    studio.engine = Engine(
        base=BaseModel(model, tokenizer, "tiny", torch.device("cpu"), torch.float32),
        adapters_dir=root / "adapters",
        fusions_dir=root / "fusions",
    )
    return studio


@pytest.fixture(scope="session")
def studio(tmp_path_factory) -> Studio:
    """Shared, read-mostly: tests may add fusions under unique names but never change adapters."""
    return build_studio(tmp_path_factory.mktemp("studio"))


@pytest.fixture()
def fresh_studio(tmp_path) -> Studio:
    """A private studio for tests that import adapters or otherwise change the library."""
    return build_studio(tmp_path, (SPECS["lang-a"], SPECS["task-b"]))
