"""The batched step's packed base projections (`fusion.packed`) against plain `F.linear`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_model

from fusion.batch_layout import Layout
from fusion.batched import RowCache, decode_step
from fusion.packed import PackedWeights, packed_weights
from fusion.runtime import FusionPlan, LowRankDelta, merged_into

pytestmark = pytest.mark.skipif(not PackedWeights(tiny_model()).enabled, reason="no oneDNN weight packing here")


def test_packed_projection_equals_linear_for_any_number_of_rows():
    torch.manual_seed(0)
    module = torch.nn.Linear(96, 160, bias=True).eval()
    store = PackedWeights(torch.nn.ModuleDict({"lm_head": module}))
    x = torch.randn(1, 96)
    assert torch.equal(store.linear(x, module), F.linear(x, module.weight, module.bias))  # one token: F.linear
    assert not store._entries
    for rows in (2, 3, 8, 17, 130):
        x = torch.randn(rows, 96)
        got = store.linear(x, module)
        want = F.linear(x, module.weight, module.bias)
        assert got.shape == want.shape == (rows, 160)
        # float32 rounding of a different summation order; outputs are of magnitude ~1
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert len(store._entries) == 1  # packed once, reused for every row count


def test_a_weight_changed_in_place_is_packed_again():
    torch.manual_seed(1)
    module = torch.nn.Linear(64, 32, bias=False).eval()
    store = PackedWeights(torch.nn.ModuleDict({"lm_head": module}))
    x = torch.randn(4, 64)
    before = store.linear(x, module)
    with torch.no_grad():
        module.weight.mul_(-2.0)
    after = store.linear(x, module)
    torch.testing.assert_close(after, F.linear(x, module.weight), rtol=0, atol=1e-5)
    torch.testing.assert_close(after, -2.0 * before, rtol=0, atol=1e-5)


def test_merged_weights_run_unpacked_and_the_originals_stay_packed():
    model = tiny_model(seed=2)
    store = packed_weights(model)
    assert packed_weights(model) is store
    layer = model.model.layers[0]
    original = layer.mlp.up_proj.weight
    x = torch.randn(5, original.shape[1])
    packed_original = store.linear(x, layer.mlp.up_proj)
    d_in, d_out = original.shape[1], original.shape[0]
    delta = LowRankDelta(A=torch.randn(2, d_in), B=torch.randn(d_out, 2))
    plan = FusionPlan(method="linear", slot_names=["a"], deltas={(0, "up_proj"): delta})
    with merged_into(model, plan):
        merged = layer.mlp.up_proj.weight
        assert merged is not original
        got = store.linear(x, layer.mlp.up_proj)
        assert torch.equal(got, F.linear(x, merged))  # the plain path, bit for bit
        assert id(merged) not in store._entries
        # a prompt under the merge reads the replaced weight's packed copy
        assert torch.equal(store.linear(x, layer.mlp.up_proj, original=True), packed_original)
    assert layer.mlp.up_proj.weight is original
    assert store._entries[id(original)][0] is original


def test_decode_step_with_and_without_packing(monkeypatch):
    """The same rows, one forward with packed projections and one through F.linear."""
    model = tiny_model(seed=3)
    base = FusionPlan(method="base", slot_names=[])
    layout = Layout(model, [base, base])
    prompts = [torch.tensor([5, 9, 14, 3, 7]), torch.tensor([11, 4, 8])]
    results = []
    for enabled in (True, False):
        monkeypatch.setattr(packed_weights(model), "enabled", enabled)
        caches = [RowCache.empty(model.config, 16, "cpu", torch.float32) for _ in prompts]
        logits = decode_step(model, layout, torch.cat(prompts), caches, [None, None], [len(p) for p in prompts])
        step = decode_step(model, layout, logits.argmax(-1), caches, [None, None])
        results.append((logits, step))
    with torch.inference_mode():
        reference = [model(p[None]).logits[0, -1] for p in prompts]
    for logits, step in results:
        torch.testing.assert_close(logits, torch.stack(reference), rtol=0, atol=1e-4)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=0, atol=1e-4)


def test_a_build_that_cannot_pack_falls_back_to_linear(monkeypatch):
    """Where the packing ops exist but fail (another architecture), nothing is packed."""
    from fusion import packed

    def broken(weight):
        raise RuntimeError("no packed format on this CPU")

    monkeypatch.setattr(packed, "_pack", broken)
    packed._packing_works.cache_clear()
    try:
        model = tiny_model(seed=5)
        store = PackedWeights(model)
        assert not store.enabled
        x = torch.randn(4, 32)
        assert torch.equal(store.linear(x, model.lm_head), F.linear(x, model.lm_head.weight))
    finally:
        packed._packing_works.cache_clear()
