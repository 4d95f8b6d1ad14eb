"""Exports load in plain peft/transformers (no project code) with the engine's logits."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import tiny_model, write_lora

from fusion.engine import Engine, FusionRequest
from fusion.errors import FusionError
from fusion.export import export_merged, export_peft
from fusion.model import BaseModel

CASES = [
    ("linear", ["lang-a", "task-b", "task-c"], {"weights": [0.5, 0.8, -0.3]}),
    ("cat", ["lang-a", "task-b"], {}),
    ("lorahub", ["lang-a", "task-b"], {"weights": [0.9, 0.4]}),
    ("ties", ["lang-a", "task-b"], {"density": 0.5}),
    ("single", ["task-c"], {}),
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    model = tiny_model(seed=21, layers=2)
    pristine = copy.deepcopy(model)
    write_lora(tmp / "adapters" / "lang-a", model, rank=4, alpha=8.0, seed=1)
    write_lora(tmp / "adapters" / "task-b", model, rank=4, alpha=8.0, seed=2)
    write_lora(tmp / "adapters" / "task-c", model, rank=6, alpha=4.0, seed=3, modules=("q_proj", "v_proj", "down_proj"))
    engine = Engine(
        base=BaseModel(model, None, "tiny", torch.device("cpu"), torch.float32),
        adapters_dir=tmp / "adapters",
        fusions_dir=tmp / "fusions",
    )
    return engine, pristine, tmp


@pytest.mark.parametrize("method,adapters,params", CASES)
def test_peft_export_reproduces_engine_logits(setup, method, adapters, params):
    from peft import PeftModel

    engine, pristine, tmp = setup
    out = export_peft(engine, FusionRequest(adapters, method, params), tmp / f"peft-{method}")
    loaded = PeftModel.from_pretrained(copy.deepcopy(pristine), str(out)).eval()
    ids = torch.randint(3, 90, (2, 9))
    ours, _ = engine.logits(FusionRequest(adapters, method, params), ids)
    with torch.no_grad():
        theirs = loaded(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    config = json.loads((out / "adapter_config.json").read_text())
    if method == "linear":  # exact linear = concatenated factors: rank 4+4+6 where all three apply
        assert config["r"] == 8 and 14 in config["rank_pattern"].values()


def test_merged_export_is_a_plain_model_and_leaves_the_engine_untouched(setup):
    from transformers import AutoModelForCausalLM

    engine, _, tmp = setup
    before = {n: p.clone() for n, p in engine.model.named_parameters()}
    request = FusionRequest(["lang-a", "task-b"], "linear", {"weights": [0.3, 0.7]})
    out = export_merged(engine, request, tmp / "merged")
    merged = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ids = torch.randint(3, 90, (1, 7))
    ours, _ = engine.logits(request, ids)
    with torch.no_grad():
        theirs = merged(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    assert all(torch.equal(p, before[n]) for n, p in engine.model.named_parameters())
    with pytest.raises(FusionError, match="already exists"):
        export_merged(engine, request, tmp / "merged")


def test_dynamic_methods_are_refused(setup):
    engine, _, tmp = setup
    with pytest.raises(FusionError, match="only static fusions export"):
        export_peft(engine, FusionRequest(["lang-a", "task-b"], "lora_flow"), tmp / "nope")
    assert not (tmp / "nope").exists()
