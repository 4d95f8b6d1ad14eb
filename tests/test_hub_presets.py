"""The papers' released checkpoints through hub references and presets, offline on fixtures
written in exactly the released formats."""

from __future__ import annotations

import pytest
import torch
from helpers import lora_state, tiny_model, write_lora
from mixlora_helpers import mixlora_config, mixlora_state, write_mixlora

import fusion.hub as hub
from fusion.engine import Engine, FusionRequest
from fusion.errors import FusionError
from fusion.methods.lora_flow import save_released_gates
from fusion.model import BaseModel
from fusion.presets import get_preset, preset_names


@pytest.fixture()
def fake_hub(tmp_path, monkeypatch):
    """Repositories laid out as on the hub; downloads are served from them."""
    model = tiny_model(seed=12, layers=3)
    repo = tmp_path / "hub" / "Bowen232" / "LoRA-Flow"
    for seed, name in enumerate(("es_lora", "zh_lora", "math_lora", "code_lora")):
        # Released LoRAs: fp16 pickles with old peft keys (no adapter name).
        state = {k: v.half() for k, v in lora_state(model, rank=4, seed=40 + seed, legacy=True).items()}
        write_lora(repo / "LoRAs" / name, model, rank=4, alpha=8.0, fmt="bin", state=state)
    g = torch.Generator().manual_seed(3)
    (repo / "Gates").mkdir()
    for gate in ("es_math", "zh_math"):
        save_released_gates(
            torch.randn(3, 2, 32, generator=g), torch.randn(3, 1, 2, generator=g) * 0.3, repo / "Gates" / f"{gate}.pt"
        )
    mix = tmp_path / "hub" / "TUDB-Labs" / "alpaca-mixlora-7b"
    write_mixlora(mix, mixlora_config(tmp_path, num_experts=4), mixlora_state(model, num_experts=4))
    calls = []

    def download(repo_id, subpath, offline):
        calls.append((repo_id, subpath))
        return tmp_path / "hub" / repo_id / subpath

    monkeypatch.setattr(hub, "download", download)
    engine = Engine(
        base=BaseModel(model, None, "tiny", torch.device("cpu"), torch.float32),
        adapters_dir=tmp_path / "adapters",
        fusions_dir=tmp_path / "fusions",
    )
    return engine, tmp_path / "hub", calls


def test_lora_flow_preset_equals_the_same_files_by_path(fake_hub):
    engine, root, calls = fake_hub
    preset = get_preset("lora-flow:zh-math")
    assert preset.model == "meta-llama/Llama-2-7b-hf"
    assert preset.request.params["temperature"] == 1.1  # released zh/ru math gates
    assert get_preset("lora-flow:es-math").request.params["temperature"] == 1.0
    ids = torch.randint(3, 90, (1, 8))
    by_preset, _ = engine.logits(preset.request, ids)
    repo = root / "Bowen232" / "LoRA-Flow"
    direct = FusionRequest(
        [str(repo / "LoRAs" / "zh_lora"), str(repo / "LoRAs" / "math_lora")],
        "lora_flow",
        {"gates": str(repo / "Gates" / "zh_math.pt"), "temperature": 1.1},
    )
    by_path, _ = engine.logits(direct, ids)
    torch.testing.assert_close(by_preset, by_path, atol=0, rtol=0)
    assert ("Bowen232/LoRA-Flow", "Gates/zh_math.pt") in calls
    assert ("Bowen232/LoRA-Flow", "LoRAs/zh_lora") in calls
    base, _ = engine.logits(FusionRequest(), ids)
    assert not torch.allclose(by_preset, base, atol=1e-4)


def test_mixlora_preset_loads_the_released_format(fake_hub):
    engine, _, calls = fake_hub
    preset = get_preset("mixlora:alpaca-7b")
    logits, run = engine.logits(preset.request, torch.randint(3, 90, (1, 5)), record=True)
    assert calls == [("TUDB-Labs/alpaca-mixlora-7b", "")]
    assert torch.isfinite(logits).all() and run.router_steps


def test_presets_are_listed_and_unknown_ones_refused():
    assert "lora-flow:ru-code" in preset_names() and "mixlora:alpaca-7b" in preset_names()
    with pytest.raises(FusionError, match="unknown preset"):
        get_preset("lora-flow")
    with pytest.raises(FusionError, match="released gates"):
        get_preset("lora-flow:fr-math")


def test_uncached_hub_reference_offline_is_one_clear_sentence(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    with pytest.raises(FusionError) as caught:
        hub.resolve_ref("hf:Bowen232/LoRA-Flow/Gates/es_math.pt")
    message = str(caught.value)
    assert "without network access" in message and "\n" not in message
    with pytest.raises(FusionError, match="must look like"):
        hub.resolve_ref("hf:justone")
