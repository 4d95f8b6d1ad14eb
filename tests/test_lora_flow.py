"""LoRA-Flow against a direct re-implementation of its formula, plus gates I/O, training, cache."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from helpers import MODULES, TEST_SEED, lora_state, tiny_model, write_lora

from fusion.engine import Engine, FusionRequest
from fusion.errors import FusionError
from fusion.generate import Sampling, stream_tokens
from fusion.methods.lora_flow import initial_bias, save_released_gates
from fusion.model import BaseModel
from fusion.runtime import Run, activate

LAYERS = 3


def reference_logits(model, states, scales, W, b, temperature, ids):
    """Plain PyTorch hooks on a fresh copy: per layer w = softmax(W_l h / T) + b_l from the layer
    input, then every projection adds sum_i w_i s_i B_i A_i x, one slot at a time."""
    model = copy.deepcopy(model)
    weights = {}
    handles = []
    for l, layer in enumerate(model.model.layers):

        def pre(module, args, kwargs, l=l):
            h = args[0] if args else kwargs["hidden_states"]
            weights[l] = torch.softmax(h @ W[l].T / temperature, dim=-1) + b[l]

        handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
        for name in MODULES:
            block = layer.self_attn if name in MODULES[:4] else layer.mlp
            prefix = f"base_model.model.model.layers.{l}.{'self_attn' if name in MODULES[:4] else 'mlp'}.{name}"

            def post(module, args, out, l=l, prefix=prefix):
                x = args[0]
                for i, (state, s) in enumerate(zip(states, scales)):
                    A, B = state[f"{prefix}.lora_A.weight"], state[f"{prefix}.lora_B.weight"]
                    out = out + weights[l][..., i : i + 1] * s * (x @ A.T @ B.T)
                return out

            handles.append(getattr(block, name).register_forward_hook(post))
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=False).logits
    for h in handles:
        h.remove()
    return out, weights


@pytest.fixture()
def setup(tmp_path):
    model = tiny_model(seed=3, layers=LAYERS)
    pristine = copy.deepcopy(model)
    states = [lora_state(model, rank=4, seed=s) for s in (11, 12, 13)]
    for name, state in zip(("lang-a", "task-b", "task-c"), states):
        write_lora(tmp_path / "adapters" / name, model, rank=4, alpha=8.0, state=state)
    engine = Engine(
        base=BaseModel(model, None, "tiny", torch.device("cpu"), torch.float32),
        adapters_dir=tmp_path / "adapters",
        fusions_dir=tmp_path / "fusions",
    )
    return engine, pristine, states, tmp_path


def random_gates(k, hidden, seed=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(LAYERS, k, hidden, generator=g) * 0.5, torch.randn(LAYERS, 1, k, generator=g) * 0.3


def test_forward_equals_direct_formula_with_released_gate_file(setup):
    engine, pristine, states, tmp = setup
    W, b = random_gates(2, 32)
    save_released_gates(W, b, tmp / "es_math.pt")
    ids = torch.randint(3, 90, (2, 9))
    ours, run = engine.logits(
        FusionRequest(["lang-a", "task-b"], "lora_flow", {"gates": str(tmp / "es_math.pt"), "temperature": 1.1}),
        ids,
        record=True,
    )
    ref, ref_weights = reference_logits(pristine, states[:2], [2.0, 2.0], W, b, 1.1, ids)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    for l in range(LAYERS):  # the recorded trace is batch 0's raw weights
        torch.testing.assert_close(run.steps[0][l], ref_weights[l][0], atol=1e-6, rtol=1e-6)
    # Raw weights are not renormalised: with a non-zero bias they do not sum to 1.
    assert not torch.allclose(ref_weights[0].sum(-1), torch.ones(2, 9))


def test_three_slots_match_formula(setup):
    engine, pristine, states, tmp = setup
    W, b = random_gates(3, 32, seed=8)
    save_released_gates(W, b, tmp / "g3.pt")
    ids = torch.randint(3, 90, (1, 6))
    ours, _ = engine.logits(
        FusionRequest(["lang-a", "task-b", "task-c"], "lora_flow", {"gates": str(tmp / "g3.pt")}), ids
    )
    ref, _ = reference_logits(pristine, states, [2.0] * 3, W, b, 1.0, ids)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("slot", [0, 1])
def test_one_hot_gates_reproduce_single(setup, slot):
    engine, _, _, tmp = setup
    W = torch.zeros(LAYERS, 2, 32)
    b = torch.full((LAYERS, 1, 2), -0.5)
    b[..., slot] = 0.5  # softmax(0) = 0.5 each, + b = one-hot
    save_released_gates(W, b, tmp / "onehot.pt")
    ids = torch.randint(3, 90, (1, 7))
    flow, _ = engine.logits(FusionRequest(["lang-a", "task-b"], "lora_flow", {"gates": str(tmp / "onehot.pt")}), ids)
    single, _ = engine.logits(FusionRequest([["lang-a", "task-b"][slot]], "single"), ids)
    torch.testing.assert_close(flow, single, atol=1e-5, rtol=1e-5)


def test_initial_gates_are_all_task_and_uniform_gates_equal_linear(setup):
    engine, _, _, tmp = setup
    assert initial_bias(LAYERS, 2)[0].tolist() == [[-0.5, 0.5]]
    assert torch.allclose(initial_bias(LAYERS, 4)[0, 0], torch.tensor([-0.25, -0.25, -0.25, 0.75]))
    ids = torch.randint(3, 90, (1, 7))
    initial, _ = engine.logits(FusionRequest(["lang-a", "task-b"], "lora_flow"), ids)
    task, _ = engine.logits(FusionRequest(["task-b"], "single"), ids)
    torch.testing.assert_close(initial, task, atol=1e-5, rtol=1e-5)
    save_released_gates(torch.zeros(LAYERS, 3, 32), torch.zeros(LAYERS, 1, 3), tmp / "uniform.pt")
    adapters = ["lang-a", "task-b", "task-c"]
    uniform, _ = engine.logits(FusionRequest(adapters, "lora_flow", {"gates": str(tmp / "uniform.pt")}), ids)
    linear, _ = engine.logits(FusionRequest(adapters, "linear", {"weights": [1 / 3] * 3}), ids)
    torch.testing.assert_close(uniform, linear, atol=1e-5, rtol=1e-5)


def test_wrong_gate_shapes_are_refused(setup):
    engine, _, _, tmp = setup
    W, b = random_gates(3, 32)
    save_released_gates(W, b, tmp / "k3.pt")
    with pytest.raises(FusionError, match=r"lora_fusion_gate.weight has shape \(3, 32\); expected \(2, 32\)"):
        engine.plan(FusionRequest(["lang-a", "task-b"], "lora_flow", {"gates": str(tmp / "k3.pt")}))
    W, b = random_gates(2, 32)
    state = {}
    for l in range(LAYERS - 1):  # one layer short
        state[f"encoder.layers.{l}.lora_fusion_gate.weight"] = W[l]
        state[f"encoder.layers.{l}.weight_bias"] = b[l]
    torch.save(state, tmp / "short.pt")
    with pytest.raises(FusionError, match="no gate weight/bias for layer 2"):
        engine.plan(FusionRequest(["lang-a", "task-b"], "lora_flow", {"gates": str(tmp / "short.pt")}))
    with pytest.raises(FusionError, match="temperature"):
        engine.plan(FusionRequest(["lang-a", "task-b"], "lora_flow", {"temperature": 0}))


def _toy_records(n=16):
    words = ["apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "orbit"]
    return [{"prompt": f"say {words[i % 8]}", "response": f"{words[i % 8]} {words[(i + 3) % 8]}"} for i in range(n)]


@pytest.fixture()
def token_engine(tmp_path):
    """A tiny model with the embedded model's tokenizer (49152 ids), for fit and generation."""
    from transformers import AutoTokenizer

    from fusion.model import dense_default_copy

    tokenizer = AutoTokenizer.from_pretrained(str(dense_default_copy()))
    model = tiny_model(seed=4, layers=LAYERS, vocab=len(tokenizer))
    model.config.eos_token_id = tokenizer.eos_token_id
    for name, seed in (("lang-a", 21), ("task-b", 22)):
        write_lora(tmp_path / "adapters" / name, model, rank=4, alpha=8.0, seed=seed)
    engine = Engine(
        base=BaseModel(model, tokenizer, "tiny", torch.device("cpu"), torch.float32),
        adapters_dir=tmp_path / "adapters",
        fusions_dir=tmp_path / "fusions",
    )
    return engine


@pytest.mark.numeric
def test_gate_training_lowers_loss(setup, figures):
    """Targets are the language LoRA's own greedy picks; gates start as "all task" and must move
    so that the fused model reproduces them.

    The head is sharpened (x10) so that the language LoRA's picks are learnable: on the plain
    random model the whole gap between "all task" and "language only" was 0.16 nats, and whether
    a fit closed half of it depended on the CPU's floating-point path (45 % on one AVX-512 Xeon).
    Now the gap is 1.3-1.6 nats. Measured with tests/measure_margins.py over 8 configurations
    (seeds 0-2; ATEN_CPU_CAPABILITY default, avx2, avx512; 1 and 2 threads): gap 1.31-1.61
    (asserted > 0.6), loss drop 0.74-1.00 (asserted > 0.3), share of the gap closed 0.54-0.62
    (asserted > 0.25).
    """
    from fusion.methods import get_method
    from fusion.training import Example, mean_answer_loss

    engine, _, _, _ = setup
    engine.model.lm_head.weight.mul_(10.0)
    g = torch.Generator().manual_seed(TEST_SEED)
    prompts = torch.randint(3, 90, (24, 6), generator=g)
    with torch.no_grad():
        targets, _ = engine.logits(FusionRequest(["lang-a"], "single"), prompts)
    examples = []
    for prompt, logits in zip(prompts, targets):
        answer = logits[2:].argmax(-1)  # a deterministic function of the language LoRA
        ids = torch.cat([prompt, answer])
        mask = torch.zeros(len(ids), dtype=torch.bool)
        mask[6:] = True
        examples.append(Example(ids, mask))
    adapters = [engine.library.get_adapter(n) for n in ("lang-a", "task-b")]
    initial = Run(engine.plan(FusionRequest(["lang-a", "task-b"], "lora_flow")))
    before = mean_answer_loss(engine.model, initial, examples, 0, "cpu")
    result = get_method("lora_flow").fit(
        engine.ctx,
        adapters,
        examples,
        {},
        {"train": {"epochs": 20, "lr": 0.05, "weight_decay": 0.0, "seed": TEST_SEED}, "pad_id": 0},
    )
    W = torch.stack([result.tensors[f"gate.{l}.weight"] for l in range(LAYERS)])
    b = torch.stack([result.tensors[f"gate.{l}.bias"] for l in range(LAYERS)])
    fitted = Run(get_method("lora_flow").plan_from_gates(engine.ctx, adapters, W, b, 1.0))
    after = mean_answer_loss(engine.model, fitted, examples, 0, "cpu")
    language_only = mean_answer_loss(
        engine.model, Run(engine.plan(FusionRequest(["lang-a"], "single"))), examples, 0, "cpu"
    )
    figures.update(gap=before - language_only, drop=before - after, closed=(before - after) / (before - language_only))
    assert figures["gap"] > 0.6, (before, language_only)  # the setup leaves something to learn
    assert figures["drop"] > 0.3, (before, after)
    assert figures["closed"] > 0.25, (before, after, language_only)


def test_fit_saves_gates_that_reload(token_engine):
    engine = token_engine
    records = _toy_records()
    seen = []
    artifact = engine.fit(
        "lora_flow",
        ["lang-a", "task-b"],
        records,
        train={"epochs": 3, "lr": 5e-2},
        save_as="toy-gates",
        on_progress=seen.append,
    )
    assert [p.step for p in seen] == list(range(1, 13)) and seen[-1].total_steps == 12
    # The saved artifact is safetensors + a JSON sidecar naming slots and temperature.
    meta = json.loads((engine.library.fusions_dir / "toy-gates" / "fusion.json").read_text())
    assert meta["method"] == "lora_flow" and meta["meta"]["slots"] == ["lang-a", "task-b"]
    assert (engine.library.fusions_dir / "toy-gates" / "tensors.safetensors").is_file()
    assert artifact.tensors["gate.0.weight"].shape == (2, 32)
    ids = torch.tensor([engine.encode_messages("say apple")])
    saved, _ = engine.logits(FusionRequest(fusion="toy-gates"), ids)
    W = torch.stack([artifact.tensors[f"gate.{l}.weight"] for l in range(LAYERS)])
    b = torch.stack([artifact.tensors[f"gate.{l}.bias"] for l in range(LAYERS)])
    from fusion.methods import get_method

    adapters = [engine.library.get_adapter(n) for n in ("lang-a", "task-b")]
    direct = Run(get_method("lora_flow").plan_from_gates(engine.ctx, adapters, W, b, 1.0))
    with torch.no_grad(), activate(direct):
        expected = engine.model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(saved, expected)
    # Saving again under the same name is refused unless overwriting is asked for.
    with pytest.raises(FusionError, match="already exists"):
        engine.fit("lora_flow", ["lang-a", "task-b"], records[:4], train={"max_steps": 1}, save_as="toy-gates")


def test_fit_keeps_the_best_dev_epoch_and_saves_the_inference_temperature(token_engine):
    """Dev answers contradict the fitting answers, so the dev loss rises as the gates learn:
    the fit must measure it after every epoch and keep the gates of the best epoch."""
    from fusion.methods import get_method
    from fusion.training import mean_answer_loss, tokenize_records

    engine = token_engine
    records = _toy_records()
    words = ["apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "orbit"]
    dev_records = [{"prompt": f"say {w}", "response": f"{words[(i + 5) % 8]} {w}"} for i, w in enumerate(words)]
    dev = tokenize_records(engine.tokenizer, dev_records)
    artifact = engine.fit(
        "lora_flow",
        ["lang-a", "task-b"],
        records,
        train={"epochs": 4, "lr": 5e-2},
        save_as="dev-gates",
        dev=dev,
        inference_temperature=1.1,
    )
    dev_losses = artifact.meta["dev_losses"]
    assert len(dev_losses) == 4 and artifact.meta["dev_examples"] == 8
    best = dev_losses.index(min(dev_losses))
    assert artifact.meta["best_epoch"] == best + 1
    adapters = [engine.library.get_adapter(n) for n in ("lang-a", "task-b")]
    W = torch.stack([artifact.tensors[f"gate.{l}.weight"] for l in range(LAYERS)])
    b = torch.stack([artifact.tensors[f"gate.{l}.bias"] for l in range(LAYERS)])
    kept = Run(get_method("lora_flow").plan_from_gates(engine.ctx, adapters, W, b, 1.0))
    pad = engine.tokenizer.pad_token_id
    assert mean_answer_loss(engine.model, kept, dev, pad, "cpu") == pytest.approx(min(dev_losses), abs=1e-4)
    # Fitted at T = 1, decoded at the saved T = 1.1 unless a request asks for another.
    assert artifact.meta["temperature"] == 1.1 and artifact.meta["fit_temperature"] == 1.0
    plan = engine.plan(FusionRequest(fusion="dev-gates"))
    assert plan.info["temperature"] == 1.1
    ids = torch.tensor([engine.encode_messages("say apple")])
    saved, _ = engine.logits(FusionRequest(fusion="dev-gates"), ids)
    direct = Run(get_method("lora_flow").plan_from_gates(engine.ctx, adapters, W, b, 1.1))
    with torch.no_grad(), activate(direct):
        expected = engine.model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(saved, expected)


def test_dev_checkpoint_choice_keeps_the_best_epoch_not_the_last(setup, monkeypatch):
    """The dev loss is scripted (best at epoch 2 of 4) so that the choice itself is tested, not
    whether a particular fit happens to overfit: the returned gates are exactly those measured
    after epoch 2, and the meta says so."""
    from fusion import training
    from fusion.methods import get_method
    from fusion.training import Example

    engine, _, _, _ = setup
    g = torch.Generator().manual_seed(0)
    examples = []
    for _ in range(8):
        ids = torch.randint(3, 90, (9,), generator=g)
        mask = torch.zeros(9, dtype=torch.bool)
        mask[6:] = True
        examples.append(Example(ids, mask))
    scripted, seen = iter([4.0, 3.0, 3.5, 3.9]), []

    def scripted_dev_loss(model, run, dev, pad_id, device, batch_size=8):
        W, b, _ = run.plan.gate_tensors
        seen.append((W.detach().clone(), b.detach().clone()))
        return next(scripted)

    monkeypatch.setattr(training, "mean_answer_loss", scripted_dev_loss)
    adapters = [engine.library.get_adapter(n) for n in ("lang-a", "task-b")]
    result = get_method("lora_flow").fit(
        engine.ctx,
        adapters,
        examples,
        {},
        {"train": {"epochs": 4, "lr": 0.05, "batch_size": 4}, "pad_id": 0, "dev": examples[:4]},
    )
    assert result.meta["dev_losses"] == [4.0, 3.0, 3.5, 3.9] and result.meta["best_epoch"] == 2
    assert len(seen) == 4 and not torch.equal(seen[1][1], seen[3][1])  # the gates kept moving after epoch 2
    W = torch.stack([result.tensors[f"gate.{l}.weight"] for l in range(LAYERS)])
    b = torch.stack([result.tensors[f"gate.{l}.bias"] for l in range(LAYERS)])
    assert torch.equal(W, seen[1][0]) and torch.equal(b, seen[1][1])


def test_fit_cancel_stops_early(token_engine):
    import threading

    cancel = threading.Event()

    def stop_after_two(progress):
        if progress.step == 2:
            cancel.set()

    artifact = token_engine.fit(
        "lora_flow",
        ["lang-a", "task-b"],
        _toy_records(),
        train={"epochs": 5},
        on_progress=stop_after_two,
        cancel=cancel,
    )
    assert len(artifact.meta["losses"]) == 2 and artifact.meta["cancelled"]


def test_cached_generation_equals_uncached_forward(token_engine, tmp_path):
    engine = token_engine
    W, b = random_gates(2, 32, seed=9)
    save_released_gates(W, b, tmp_path / "g.pt")
    request = FusionRequest(["lang-a", "task-b"], "lora_flow", {"gates": str(tmp_path / "g.pt")})
    prompt = engine.encode_messages("hello there")
    events = list(
        stream_tokens(
            engine.model,
            engine.tokenizer,
            Run(engine.plan(request)),
            prompt,
            Sampling(max_new_tokens=12),
            record_trace=True,
        )
    )
    final = events[-1]
    generated = final.token_ids
    assert len(generated) >= 4
    full = torch.tensor([prompt + generated])
    logits, run = engine.logits(request, full, record=True)
    greedy = logits[0, len(prompt) - 1 : -1].argmax(-1).tolist()
    assert greedy == generated  # same tokens without the cache
    uncached = torch.stack([run.steps[0][l] for l in range(LAYERS)], dim=1)  # (tokens, layers, 2)
    assert final.trace.shape == (len(prompt) + len(generated), LAYERS, 2)
    torch.testing.assert_close(final.trace.weights, uncached, atol=1e-5, rtol=1e-5)
    assert final.trace.tokens[-1] == engine.tokenizer.decode([generated[-1]])
