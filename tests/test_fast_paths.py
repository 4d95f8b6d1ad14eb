"""Each speed-up equals the straightforward computation it replaces."""

from __future__ import annotations

import threading

import pytest
import torch
from helpers import tiny_model, write_lora

from fusion.engine import Engine, FusionRequest
from fusion.errors import FusionError
from fusion.generate import Sampling
from fusion.methods import get_method
from fusion.methods.base import module_keys
from fusion.model import BaseModel
from fusion.runtime import GroupMember, Run, activate, group_shared_inputs, merged_into


@pytest.fixture()
def engine(tmp_path):
    model = tiny_model(seed=7, layers=2)
    for i, name in enumerate(("lang-a", "task-b", "task-c")):
        write_lora(tmp_path / "adapters" / name, model, rank=4 + 2 * i, alpha=8.0, seed=30 + i)
    return Engine(
        base=BaseModel(model, None, "tiny", torch.device("cpu"), torch.float32),
        adapters_dir=tmp_path / "adapters",
        fusions_dir=tmp_path / "fusions",
    )


def _logits(engine, plan, ids):
    with torch.no_grad(), activate(Run(plan)):
        return engine.model(input_ids=ids, use_cache=False).logits


CASES = [
    ("linear", ["lang-a", "task-b", "task-c"], {"weights": [0.2, 0.5, 0.3]}),
    ("cat", ["lang-a", "task-b"], {}),
    ("single", ["task-c"], {}),
    ("lora_flow", ["lang-a", "task-b", "task-c"], {}),
]


@pytest.mark.parametrize("method,adapters,params", CASES)
def test_grouped_shared_inputs_equal_separate_matmuls(engine, method, adapters, params):
    objs = [engine.library.get_adapter(a) for a in adapters]
    m = get_method(method)
    plain = m.build(engine.ctx, objs, m.validate(objs, params))
    grouped = engine.plan(FusionRequest(adapters, method, params))
    assert sum(isinstance(d, GroupMember) for d in grouped.deltas.values()) == 2 * 5  # q,k,v + gate,up per layer
    ids = torch.randint(3, 90, (2, 8))
    torch.testing.assert_close(_logits(engine, grouped, ids), _logits(engine, plain, ids), atol=1e-5, rtol=1e-5)


def test_grouping_leaves_trainable_deltas_alone(engine):
    objs = [engine.library.get_adapter(a) for a in ("lang-a", "task-b")]
    keys = module_keys(objs)
    logits = torch.zeros(len(keys), 2, requires_grad=True)
    plan = get_method("cat").plan_from_logits(engine.ctx, objs, keys, logits, keep_coef=True)
    assert group_shared_inputs(plan.deltas) == plan.deltas


@pytest.mark.parametrize("method,adapters,params", CASES[:3])
def test_merged_equals_unmerged_and_restore_is_bit_exact(engine, method, adapters, params):
    before = {n: p.detach().clone() for n, p in engine.model.named_parameters()}
    plan = engine.plan(FusionRequest(adapters, method, params))
    ids = torch.randint(3, 90, (1, 10))
    unmerged = _logits(engine, plan, ids)
    with merged_into(engine.model, plan) as merged_plan:
        assert not merged_plan.deltas
        merged = _logits(engine, merged_plan, ids)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    for name, p in engine.model.named_parameters():
        assert torch.equal(p, before[name]), name


def test_using_merges_a_static_plan_only_into_an_idle_model(engine, monkeypatch):
    from fusion import engine as engine_module

    monkeypatch.setattr(engine_module, "MERGE_WAIT_S", 0.05)  # the lock is held by this very thread
    static = engine.plan(FusionRequest(["lang-a", "task-b"], "linear"))
    dynamic = engine.plan(FusionRequest(["lang-a", "task-b"], "lora_flow"))
    before = {n: p.detach().clone() for n, p in engine.model.named_parameters()}
    ids = torch.randint(3, 90, (1, 10))
    factors = _logits(engine, static, ids)
    with engine.using(static) as running:  # idle: merged
        assert running is not static and not running.deltas and running.info["merged"]
        torch.testing.assert_close(_logits(engine, running, ids), factors, atol=1e-5, rtol=1e-5)
        with pytest.raises(FusionError, match="busy"):
            with engine.using(static, merge=True):
                pass
    for name, p in engine.model.named_parameters():
        assert torch.equal(p, before[name]), name
    with engine.using(static, merge=False) as running:  # another request holds the model: factors
        assert running is static
        with engine.using(static) as second:
            assert second is static
        with pytest.raises(FusionError, match="busy"):
            with engine.using(static, merge=True):
                pass
    with engine.using(dynamic) as running:
        assert running is dynamic
    with pytest.raises(FusionError, match="per token"):
        with engine.using(dynamic, merge=True):
            pass
    engine.merge_static = "never"
    with engine.using(static) as running:
        assert running is static
    with engine.using(static, merge=True) as running:  # asked for explicitly (export, benchmarks)
        assert not running.deltas


def test_a_merge_waits_for_a_request_that_is_letting_go_of_the_model():
    """The scheduler gives the model back a moment after a reply's last event: a merge asked for
    right then (an export, a benchmark's switch) waits for it instead of failing as busy."""
    import threading

    from fusion.runtime import ModelLock

    lock = ModelLock()
    lock.acquire_shared()
    assert not lock.try_exclusive()  # no wait by default
    threading.Timer(0.05, lock.release_shared).start()
    assert lock.try_exclusive(timeout=10.0)
    assert not lock.try_exclusive(timeout=0.05)  # a writer holds it now
    lock.release_exclusive()
    assert lock.try_exclusive()


@pytest.mark.parametrize("reuse", [True, False])
def test_successive_merges_with_reused_buffers_are_exact(engine, reuse):
    """Merged weights written into kept buffers: a second plan overwrites the first one's
    values completely, and the original weights come back bit-exactly each time."""
    before = {n: p.detach().clone() for n, p in engine.model.named_parameters()}
    ids = torch.randint(3, 90, (1, 10))
    for method, adapters, params in CASES[:3] + CASES[:1]:
        plan = engine.plan(FusionRequest(adapters, method, params))
        unmerged = _logits(engine, plan, ids)
        with merged_into(engine.model, plan, reuse_buffers=reuse) as merged_plan:
            merged = _logits(engine, merged_plan, ids)
        torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
        for name, p in engine.model.named_parameters():
            assert torch.equal(p, before[name]), name
    if reuse:
        assert engine.model.__dict__["_fusion_merge_buffers"]
        # buffers first made under inference mode serve later merges outside it, and back
        engine.model.__dict__["_fusion_merge_buffers"].clear()
        plan = engine.plan(FusionRequest(*CASES[0][1:2], CASES[0][0], CASES[0][2]))
        want = _logits(engine, plan, ids)
        for mode in (True, False, True):
            with torch.inference_mode(mode), merged_into(engine.model, plan, reuse_buffers=True) as merged_plan:
                torch.testing.assert_close(_logits(engine, merged_plan, ids), want, atol=1e-5, rtol=1e-5)


def test_dynamic_plans_refuse_to_merge(engine):
    plan = engine.plan(FusionRequest(["lang-a", "task-b"], "lora_flow"))
    with pytest.raises(ValueError):
        with merged_into(engine.model, plan):
            pass


class _Tok:
    """Just enough tokenizer for stream_ids on the tiny model."""

    eos_token_id = 2
    unk_token_id = 0
    pad_token_id = 0

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(65 + i % 26) for i in ids)

    def convert_tokens_to_ids(self, token):
        return 0


def test_requests_wait_while_another_request_holds_merged_weights(engine, monkeypatch):
    import fusion.scheduler

    engine.tokenizer = _Tok()
    request = FusionRequest(["lang-a", "task-b"], "linear")
    ids = torch.randint(3, 90, (1, 6))
    base_alone, _ = engine.logits(FusionRequest(), ids)
    paused, go_on = threading.Event(), threading.Event()
    step = fusion.scheduler.decode_step

    def held_step(*args, **kwargs):  # keeps the merged request mid-generation until the test lets go
        paused.set()
        go_on.wait(10)
        return step(*args, **kwargs)

    monkeypatch.setattr(fusion.scheduler, "decode_step", held_step)
    stream = engine.stream_ids(request, [5, 6, 7], Sampling(max_new_tokens=4), trace=False)
    next(stream, None)
    assert paused.wait(10)  # the merged request is now mid-generation and owns the model
    assert engine.model.model.layers[0].self_attn.q_proj.weight is not None
    result = {}

    def other():
        result["logits"], _ = engine.logits(FusionRequest(), ids)

    worker = threading.Thread(target=other)
    worker.start()
    worker.join(timeout=0.5)
    assert worker.is_alive()  # blocked: it must not compute on merged weights
    stream.close()  # finishing (or abandoning) the merged request restores and releases
    go_on.set()
    worker.join(timeout=10)
    assert not worker.is_alive()
    torch.testing.assert_close(result["logits"], base_alone, atol=0, rtol=0)


def test_concurrent_unmerged_requests_do_not_wait(engine):
    engine.tokenizer = _Tok()
    ids = torch.randint(3, 90, (1, 6))
    flow = FusionRequest(["lang-a", "task-b"], "lora_flow")
    expected, _ = engine.logits(flow, ids)
    stream = engine.stream_ids(flow, [5, 6, 7], Sampling(max_new_tokens=4), trace=False)
    next(stream, None)  # a dynamic request in progress shares the model
    got, _ = engine.logits(flow, ids)  # same thread, would deadlock if it had to wait
    stream.close()
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


@pytest.mark.parametrize("modules", [("gate_proj", "up_proj", "down_proj"), ("up_proj",), ("down_proj",), ()])
@pytest.mark.parametrize("tokens", [1, 5])
@pytest.mark.parametrize("path", ["native", "picked", "masked"])
def test_mixlora_few_token_paths_equal_the_expert_loop(monkeypatch, modules, tokens, path):
    """The paths for a few tokens against the per-expert loop that larger batches take, with
    any subset of the three projections carrying expert LoRAs: routing and mixture in one call
    of the C kernel (`native`, on CPU at inference where experts carry LoRAs), each pick
    reading its own expert's factors (`picked`), and all experts' factors side by side, the
    chosen ones kept by a mask (`masked`)."""
    from fusion import native
    from fusion.methods import mixlora_ffn
    from fusion.methods.mixlora_ffn import LayerExperts, routed_ffn

    if path == "native":
        if not native.available():
            pytest.skip("no C compiler here")
        routed = native.NativeExperts.routed
        monkeypatch.setattr(native.NativeExperts, "routed", lambda *args: _served(routed(*args), taken))
    else:
        monkeypatch.setattr(mixlora_ffn, "_native", lambda *args: None)  # the torch paths

    model = tiny_model(seed=9, layers=1)
    mlp = model.model.layers[0].mlp
    g = torch.Generator().manual_seed(1)
    E, r, d, f = 6, 3, 32, mlp.gate_proj.out_features
    shapes = {"gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}
    experts = LayerExperts(
        {
            name: (torch.randn(E, r, shapes[name][0], generator=g), torch.randn(E, shapes[name][1], r, generator=g))
            for name in modules
        }
    )
    router = torch.randn(E, d, generator=g)
    x = torch.randn(1, tokens, d, generator=g)
    taken = []
    for name in ("_picked_mixture", "_masked_mixture"):
        monkeypatch.setattr(mixlora_ffn, name, _recording(getattr(mixlora_ffn, name), name, taken))
    monkeypatch.setattr(mixlora_ffn, "PICKED_SHARE", 0.0 if path == "masked" else 100.0)
    fast, _, _, chosen = routed_ffn(x, mlp, router, experts, 2, mlp.act_fn)
    if path != "native":
        assert taken == [f"_{path}_mixture"]
    elif modules:
        assert taken == ["native"]
    else:  # no expert LoRAs: the torch path
        assert taken == ["_picked_mixture"]
    assert experts._stacked is not None or not modules  # the stacked forms were made and kept
    plain, _, _, _ = routed_ffn(x, mlp, router, dict(experts), 2, mlp.act_fn)  # stacked on the fly
    monkeypatch.setattr(mixlora_ffn, "FEW_PAIRS", 0)
    monkeypatch.setattr(mixlora_ffn, "PICKED_SHARE", 0.0)
    monkeypatch.setattr(mixlora_ffn, "_native", lambda *args: None)
    count = len(taken)
    loop, _, _, chosen_loop = routed_ffn(x, mlp, router, experts, 2, mlp.act_fn)
    assert len(taken) == count  # the loop took none of the paths
    assert torch.equal(chosen, chosen_loop) and chosen.shape == (tokens, 2)
    scale = loop.abs().max()
    # the C kernel sums in another order than BLAS and its SiLU's exponential is a polynomial
    # (within 2 ulp): 2.0e-6 of the largest output measured, against 1e-6 for the torch paths
    tolerance = 1e-5 if taken[:1] == ["native"] else 1e-6
    torch.testing.assert_close(fast / scale, loop / scale, atol=tolerance, rtol=0)
    assert torch.equal(fast, plain)


@pytest.mark.parametrize("path", ["picked", "masked"])
def test_mixlora_few_token_path_gradients_equal_the_expert_loop(monkeypatch, path):
    """Training can take these paths too (a batch of a few tokens): the gradients of the input
    (through the routing weights as well) and of every expert factor equal the loop's."""
    from fusion.methods import mixlora_ffn
    from fusion.methods.mixlora_ffn import expert_mixture

    g = torch.Generator().manual_seed(2)
    E, r, d, f = 8, 3, 16, 24
    shapes = {"gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}
    experts = {
        name: (
            torch.randn(E, r, a, generator=g).requires_grad_(),
            torch.randn(E, b, r, generator=g).requires_grad_(),
        )
        for name, (a, b) in shapes.items()
    }
    router = torch.randn(E, d, generator=g)
    x = torch.randn(2, d, generator=g).requires_grad_()
    gate, up = torch.randn(2, f, generator=g), torch.randn(2, f, generator=g)
    leaves = [x] + [t for pair in experts.values() for t in pair]
    grads = {}
    for name, share, few in ((path, 100.0 if path == "picked" else 0.0, 64), ("loop", 0.0, 0)):
        monkeypatch.setattr(mixlora_ffn, "PICKED_SHARE", share)
        monkeypatch.setattr(mixlora_ffn, "FEW_PAIRS", few)
        mixed, down, *_ = expert_mixture(x, gate, up, router, dict(experts), 2, torch.nn.functional.silu)
        grads[name] = torch.autograd.grad((mixed * mixed).sum() + down.sum(), leaves)
    for got, want in zip(grads[path], grads["loop"]):
        scale = want.abs().max()
        assert scale > 0
        torch.testing.assert_close(got / scale, want / scale, atol=1e-5, rtol=0)


def _served(result, taken):
    if result is not None:
        taken.append("native")
    return result


def _recording(fn, name, taken):
    def wrapper(*args):
        taken.append(name)
        return fn(*args)

    return wrapper
