"""A base model that the batched forward does not compute (here a tiny random Gemma 3: query/key
norms, sandwich norms, sliding-window layers) still serves every fusion through the scheduler:
its rows decode through the model's own forward, taking turns, and each equals its solo run."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from fixtures_formats import tiny_tokenizer
from helpers import tiny_model, write_lora

from fusion.batched import supports
from fusion.engine import Engine, FusionRequest
from fusion.generate import Sampling, stream_tokens
from fusion.model import BaseModel
from fusion.runtime import Run

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def gemma_engine(tmp_path_factory):
    if not hasattr(transformers, "Gemma3ForCausalLM"):
        pytest.skip("this transformers has no Gemma 3")
    root = tmp_path_factory.mktemp("gemma")
    tokenizer = tiny_tokenizer()
    config = transformers.Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        sliding_window=4,
        max_position_embeddings=256,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(config).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    for name, seed in (("lang", 1), ("task", 2)):
        write_lora(root / "adapters" / name, model, rank=4, alpha=8.0, seed=seed)
    # A library made for another base model: its LoRA and a fusion over it do not load here.
    write_lora(root / "adapters" / "llama-only", tiny_model(layers=2, hidden=48, vocab=len(tokenizer)), rank=4)
    fusion = {"format": 1, "name": "mixed", "method": "linear", "adapters": ["llama-only", "task"], "params": {}}
    (root / "fusions" / "mixed").mkdir(parents=True)
    (root / "fusions" / "mixed" / "fusion.json").write_text(json.dumps(fusion))
    return Engine(
        base=BaseModel(model, tokenizer, "tiny-gemma3", torch.device("cpu"), torch.float32),
        adapters_dir=root / "adapters",
        fusions_dir=root / "fusions",
    )


def test_llama_family_is_batched_gemma_is_not(studio, gemma_engine):
    assert supports(studio.engine.model) and studio.engine.scheduler.batched
    assert not supports(gemma_engine.model) and not gemma_engine.scheduler.batched


def test_a_library_for_another_base_model_is_set_aside(gemma_engine):
    """Adapters of another model's shape, and the saved fusions that use them, are listed as
    errors (each with its reason), not offered."""
    assert [a["name"] for a in gemma_engine.adapters()] == ["lang", "task"]
    assert gemma_engine.fusions() == []
    errors = gemma_engine.library_errors()
    assert "expected" in errors["llama-only"] and "\n" not in errors["llama-only"]
    assert errors["mixed"] == "fusion mixed uses llama-only, which did not load for this base model"


def test_concurrent_rows_equal_their_solo_runs_and_cancel_alone(gemma_engine):
    """Three fusions at once (the prompt longer than the sliding window), one cancelled mid-way:
    the others' tokens and traces equal the model's own solo decode loop."""
    engine = gemma_engine
    requests = [
        FusionRequest(["task"], "single"),
        FusionRequest(["lang", "task"], "lora_flow"),
        FusionRequest(["lang", "task"], "linear", {"weights": [0.7, 0.5]}),
    ]
    ids = torch.randint(3, len(engine.tokenizer), (9,), generator=torch.Generator().manual_seed(4)).tolist()
    sampling = Sampling(max_new_tokens=12)
    solo = []
    for request in requests:
        events = list(
            stream_tokens(engine.model, engine.tokenizer, Run(engine.plan(request)), ids, sampling, None, True)
        )
        solo.append(events[-1])
    stop = threading.Event()
    streams = [engine.stream_ids(r, ids, sampling) for r in requests]
    streams.append(engine.stream_ids(requests[0], ids, Sampling(max_new_tokens=200), stop))
    next(streams[-1])
    stop.set()
    finals = [[e for e in s if e.done][0] for s in streams]
    for got, want in zip(finals, solo):
        assert got.token_ids == want.token_ids and got.text == want.text
    flow, reference = finals[1].trace, solo[1].trace
    assert flow.kind == "gate" and flow.slot_names == ["lang", "task"] and flow.tokens == reference.tokens
    assert flow.weights.shape == (len(ids) + 12, 3, 2) and torch.equal(flow.weights, reference.weights)
    assert finals[3].finish_reason == "cancelled" and len(finals[3].token_ids) < 200


def test_gemma_turn_format_and_stop_token_when_the_file_has_no_template(gemma_engine):
    """A Gemma tokenizer without a chat template (Gemma's GGUF files carry none) gets Gemma's
    documented turn format; <end_of_turn> stops a reply."""
    from fusion.generate import stop_token_ids
    from fusion.model import _finish
    from fusion.training import encode_chat

    tokenizer = tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    tokenizer.chat_template = None
    model = gemma_engine.model
    base = _finish(model, tokenizer, "g", torch.device("cpu"), torch.float32, "", lambda *a: None)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hola "}]
    messages += [{"role": "assistant", "content": "Hola."}, {"role": "user", "content": "2+2?"}]
    text = base.tokenizer.decode(encode_chat(base.tokenizer, messages))
    assert text == (
        "<|im_start|><start_of_turn>user\nBe brief.\n\nHola<end_of_turn>\n<start_of_turn>model\nHola.<end_of_turn>\n"
        "<start_of_turn>user\n2+2?<end_of_turn>\n<start_of_turn>model\n"
    )
    assert base.tokenizer.convert_tokens_to_ids("<end_of_turn>") in stop_token_ids(base.tokenizer, model)


def test_a_gguf_path_that_is_not_a_model_fails_in_one_sentence(tmp_path, monkeypatch):
    from fusion.errors import FusionError
    from fusion.model import load_base_model

    monkeypatch.setenv("LORA_STUDIO_CACHE", str(tmp_path / "cache"))
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 60)
    with pytest.raises(FusionError, match=r"cannot read the GGUF file .*broken\.gguf") as info:
        load_base_model(str(broken))
    assert "\n" not in str(info.value)
    assert not (tmp_path / "cache" / "gguf").exists() or not any((tmp_path / "cache" / "gguf").iterdir())
    with pytest.raises(FusionError, match="neither 'default'"):
        load_base_model(str(tmp_path / "missing.gguf"))
