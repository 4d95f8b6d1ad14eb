"""Continuous batching: rows with different fusions decode in one forward and each equals its
solo run (the patched model alone, `generate.stream_tokens`): logits, greedy text, traces,
seeded sampling; rows join mid-way, leave on cancel, and wait in a queue beyond the caps."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from app_fixtures import app_engine  # noqa: F401  (fixture)
from conftest import HIDDEN, LAYERS
from mixlora_helpers import mixlora_config, mixlora_state, write_mixlora

from fusion.batch_layout import Layout
from fusion.batched import RowCache, decode_step
from fusion.engine import FusionRequest
from fusion.generate import Sampling, stream_tokens
from fusion.layouts import Layouts
from fusion.methods.lora_flow import save_released_gates
from fusion.runtime import Run, activate, merged_into
from fusion.scheduler import Scheduler


@pytest.fixture(scope="module")
def requests(studio, tmp_path_factory) -> dict[str, FusionRequest]:
    """Nine fusions of every kind over the studio's LoRAs, a MixLoRA and fitted-looking gates."""
    root = tmp_path_factory.mktemp("batch-fusions")
    gates = {}
    for k, seed in ((2, 5), (3, 8)):
        g = torch.Generator().manual_seed(seed)
        W, b = torch.randn(LAYERS, k, HIDDEN, generator=g) * 0.5, torch.randn(LAYERS, 1, k, generator=g) * 0.3
        save_released_gates(W, b, root / f"gates{k}.pt")
        gates[k] = str(root / f"gates{k}.pt")
    model = studio.pristine
    mix = write_mixlora(
        root / "mix", mixlora_config("tiny", num_experts=4, top_k=2), mixlora_state(model, num_experts=4, seed=5)
    )
    pair = ["lang-a", "task-b"]
    return {
        "base": FusionRequest(),
        "single": FusionRequest(["task-b"], "single"),
        "linear": FusionRequest(pair, "linear", {"weights": [0.7, 0.4]}),
        "cat": FusionRequest(["lang-a", "task-c"], "cat"),
        "flow2": FusionRequest(pair, "lora_flow", {"gates": gates[2]}),
        "flow3": FusionRequest(["lang-a", "task-b", "task-c"], "lora_flow", {"gates": gates[3], "temperature": 1.1}),
        "mixlora": FusionRequest([str(mix)], "mixlora"),
        "ties": FusionRequest(pair, "ties", {"density": 0.5}),
        "wide": FusionRequest(["wide-d", "task-b"], "linear"),
    }


def prompt(studio, length: int, seed: int) -> list[int]:
    return studio.ids(batch=1, length=length, seed=seed)[0].tolist()


@torch.inference_mode()
def solo_logits(model, plan, prompt_ids: list[int], tokens: list[int]):
    """The patched model alone, as generation runs it: prefill, then one token a step."""
    from transformers import DynamicCache

    cache, run = DynamicCache(config=model.config), Run(plan, record=True)
    out = []
    with activate(run):
        out.append(model(input_ids=torch.tensor([prompt_ids]), past_key_values=cache, use_cache=True).logits[0, -1])
    for token in tokens:
        with activate(run):
            out.append(model(input_ids=torch.tensor([[token]]), past_key_values=cache, use_cache=True).logits[0, -1])
    return torch.stack(out), run


def assert_batched_equals_solo(
    model, plans: dict, prompts: dict, steps, late: set, layers: int, prompts_in_batch=False
):
    """Rows decode teacher-forced random tokens in one batch, the `late` ones joining after 3
    steps; every step's logits of every row equal its solo run within 1e-4, its gate/router
    record within 1e-5. steps: per row (a dict) or for all; rows that finish leave the batch,
    and the rest go on with the layout narrowed to them (`Layout.select`), as the scheduler does.
    prompts_in_batch: a joining row's prompt goes through the same forward as the other rows'
    next tokens (as the scheduler does); otherwise it is prefilled alone by the patched model."""
    from transformers import DynamicCache

    names = list(plans)
    budget = steps if isinstance(steps, dict) else dict.fromkeys(names, steps)
    steps = max(budget.values())
    rows = {}
    for i, name in enumerate(names):
        tokens = torch.randint(3, 90, (budget[name],), generator=torch.Generator().manual_seed(40 + i)).tolist()
        rows[name] = (tokens, *solo_logits(model, plans[name], prompts[name], tokens))
    state = {}  # name -> [cache, run, tokens fed, logits, prompt still to feed]

    def join(name):
        run, capacity = Run(plans[name], record=True), len(prompts[name]) + budget[name] + 1
        if prompts_in_batch:
            state[name] = [RowCache.empty(model.config, capacity, "cpu", torch.float32), run, 0, [], True]
            return
        cache = DynamicCache(config=model.config)
        with torch.inference_mode(), activate(run):
            first = model(input_ids=torch.tensor([prompts[name]]), past_key_values=cache, use_cache=True).logits[0, -1]
        state[name] = [RowCache(cache, capacity), run, 0, [first], False]

    for name in names:
        if name not in late:
            join(name)
    layout, previous, narrowed, joined_together = None, [], 0, 0
    for step in range(steps + 5):
        if step == 3:
            for name in late:
                join(name)
        decoding = [n for n in names if n in state and not state[n][4] and state[n][2] < budget[n]]
        new = [n for n in names if n in state and state[n][4]]
        active = decoding + new
        if not active:
            break
        if active != previous:
            if set(active) <= set(previous) and active == [n for n in previous if n in active]:  # rows only left
                layout, narrowed = layout.select([previous.index(n) for n in active]), narrowed + 1
            else:
                layout = Layout(model, [plans[n] for n in active])
            previous = active
        feeds = [[rows[n][0][state[n][2]]] for n in decoding] + [prompts[n] for n in new]
        tokens = torch.tensor([t for feed in feeds for t in feed])
        caches, runs = [state[n][0] for n in active], [state[n][1] for n in active]
        logits = decode_step(model, layout, tokens, caches, runs, [len(f) for f in feeds])
        joined_together += bool(new and decoding)
        for i, n in enumerate(active):
            if n in decoding:
                state[n][2] += 1
            state[n][3].append(logits[i])
            state[n][4] = False
    if prompts_in_batch and late:
        assert joined_together  # prompts went through a forward with rows that were decoding
    for name in names:
        _, solo, solo_run = rows[name]
        got = torch.stack(state[name][3])
        assert got.shape == solo.shape
        torch.testing.assert_close(got, solo, atol=1e-4, rtol=0, msg=f"{name}: logits differ from its solo run")
        run = state[name][1]
        assert len(run.steps) == len(solo_run.steps) and len(run.router_steps) == len(solo_run.router_steps)
        for mine, theirs in zip(run.steps, solo_run.steps):
            for layer in range(layers):
                torch.testing.assert_close(mine[layer], theirs[layer], atol=1e-5, rtol=0)
        for mine, theirs in zip(run.router_steps, solo_run.router_steps):
            for layer in theirs:
                torch.testing.assert_close(mine[layer][0], theirs[layer][0], atol=1e-5, rtol=0)
                assert torch.equal(mine[layer][1], theirs[layer][1])
    if any(p.layer_gate is not None for p in plans.values()):  # the gate weights were compared
        assert any(rows[n][2].steps for n in names)
    if any(p.mlp_override is not None for p in plans.values()):  # and the routing
        assert any(rows[n][2].router_steps for n in names)
    if len(set(budget.values())) > 1:
        assert narrowed > 0


def test_mixed_batch_logits_and_traces_equal_solo_runs(studio, requests):
    """Nine fusions and a second MixLoRA row, prompts of 3 to 21 tokens; CAT and LoRA-Flow k=3 join after 3 steps;
    rows decode 5 to 10 tokens, so the batch narrows as they finish (LoRA-Flow k=2, MixLoRA and
    TIES leave while LoRA-Flow k=3 and CAT still decode)."""
    engine = studio.engine
    plans = {n: engine.plan(r) for n, r in requests.items()}
    plans["mixlora (b)"] = plans["mixlora"]  # two rows of one MixLoRA: their experts gathered together
    prompts = {n: prompt(studio, 3 + 2 * i, seed=i) for i, n in enumerate(plans)}
    budget = {"base": 7, "single": 5, "linear": 9, "cat": 8, "flow2": 5, "flow3": 10, "mixlora": 6, "ties": 7}
    budget.update({"wide": 8, "mixlora (b)": 9})
    assert_batched_equals_solo(engine.model, plans, prompts, budget, {"flow3", "cat"}, LAYERS)


def test_prompts_in_the_batch_forward_equal_solo_prefills(studio, requests):
    """As the scheduler runs it: the rows' prompts go through one forward together (and the late
    rows' prompts through the forward of the rows already decoding); every row's logits, gate
    weights and routing for its prompt and each later step equal its solo run. The MixLoRA
    prompts are long enough for the experts' loop (more than 64 token-expert pairs)."""
    engine = studio.engine
    plans = {n: engine.plan(r) for n, r in requests.items()}
    plans["mixlora (b)"] = plans["mixlora"]
    plans["flow2 (b)"] = plans["flow2"]
    lengths = {"mixlora": 40, "mixlora (b)": 3, "flow2": 25, "flow2 (b)": 1, "flow3": 17}
    prompts = {n: prompt(studio, lengths.get(n, 4 + 3 * i), seed=10 + i) for i, n in enumerate(plans)}
    budget = {n: 3 + i % 4 for i, n in enumerate(plans)}
    late = {"flow3", "cat", "mixlora (b)", "flow2 (b)"}
    assert_batched_equals_solo(engine.model, plans, prompts, budget, late, LAYERS, prompts_in_batch=True)


def test_one_rows_prompt_alone_equals_its_solo_prefill(studio, requests):
    """A prompt alone in its forward (a lone user's message): its tokens share the row's
    coefficients as broadcast views, not copies, and the logits and gate weights equal the solo
    run, for a LoRA-Flow row (gate temperature 1.1), a static one, TIES and MixLoRA."""
    engine = studio.engine
    for i, name in enumerate(("flow3", "linear", "ties", "mixlora")):
        plan = engine.plan(requests[name])
        tokens = Layout(engine.model, [plan]).select([0] * 9)
        assert all(t.coef.shape[0] == 9 and t.coef.stride(0) == 0 for t in tokens.tables if t is not None)
        prompts = {name: prompt(studio, 9 + i, seed=30 + i)}
        assert_batched_equals_solo(engine.model, {name: plan}, prompts, 3, set(), LAYERS, prompts_in_batch=True)


def test_one_row_layouts_are_kept_for_reuse(studio, requests):
    """The scheduler's layouts: a one-row layout is built once and found again after the batch
    empties, the least recently used goes beyond `keep`, layouts of several rows are not kept."""
    engine = studio.engine
    flow, linear, ties = (engine.plan(requests[n]) for n in ("flow2", "linear", "ties"))
    layouts = Layouts(keep=2)
    first = layouts.get(engine.model, [flow])
    assert layouts.get(engine.model, [flow]) is first
    layouts.release()
    assert layouts.get(engine.model, [flow]) is first
    layouts.get(engine.model, [linear])
    layouts.get(engine.model, [ties])  # flow was used before linear: it goes
    assert list(layouts.solo) == [(id(linear),), (id(ties),)]
    assert layouts.get(engine.model, [flow]) is not first
    pair = layouts.get(engine.model, [flow, linear])
    layouts.release()
    assert layouts.get(engine.model, [flow, linear]) is not pair
    assert (id(flow), id(linear)) not in layouts.solo


def test_mixed_batch_on_the_embedded_model(app_engine):
    """The same on the embedded model (30 layers) with LoRAs of its shape: base, linear,
    LoRA-Flow and MixLoRA, prompts of different lengths, LoRA-Flow joining mid-way."""
    from app_fixtures import LAYERS as EMBEDDED_LAYERS
    from app_fixtures import MIXLORA

    engine = app_engine
    if MIXLORA not in {a["name"] for a in engine.adapters()}:
        pytest.skip("this engine has no mixlora method")
    requests = {
        "base": FusionRequest(),
        "linear": FusionRequest(["lang-es", "task-math"], "linear"),
        "flow": FusionRequest(["lang-ru", "task-math"], "lora_flow"),
        "mixlora": FusionRequest([MIXLORA], "mixlora"),
    }
    plans = {n: engine.plan(r) for n, r in requests.items()}
    prompts = {n: engine.encode_messages("Count to " + "three " * (1 + 4 * i)) for i, n in enumerate(requests)}
    assert_batched_equals_solo(engine.model, plans, prompts, 3, {"flow"}, EMBEDDED_LAYERS)


def test_an_adapter_shared_by_fusions_is_one_table_entry(studio, requests):
    """single, linear, TIES and LoRA-Flow k=2 all use task-b: its factors are stacked once per
    module; TIES's own fused factors are an entry of their own."""
    engine = studio.engine
    plans = [engine.plan(requests[n]) for n in ("single", "linear", "flow2", "ties", "base")]
    layout = Layout(engine.model, plans)
    tables = layout.tables[0]
    qkv = tables.tables[0]
    rank = 4  # lang-a and task-b are rank 4; TIES keeps the common rank
    # per module: lang-a, task-b, TIES -> 3 entries of rank 4, for q, k and v
    assert qkv.A.shape[0] == qkv.width == 3 * 3 * rank
    assert tables.offsets[0] == 0
    coef = tables.coef[:, : qkv.width]
    assert coef.shape == (5, 3 * 3 * rank)
    assert not coef[4].any()  # the base row adds exact zeros
    assert coef[:4].any(dim=1).all()
    # o, gate/up and down follow, each with the same three entries per module
    assert tables.offsets == [0, 9 * rank, 12 * rank, 18 * rank] and tables.coef.shape == (5, 21 * rank)
    only_base = Layout(engine.model, [engine.plan(FusionRequest())] * 3)
    assert all(t is None for t in only_base.tables)


def collect(stream):
    events = list(stream)
    return events[-1], events


def test_engine_streams_in_one_batch_equal_solo_streams(studio, requests):
    """Through Engine.stream: every fusion at once, one joining once the others decode; greedy
    text, token ids and trace equal the solo stream (the patched model alone)."""
    engine = studio.engine
    sampling = Sampling(max_new_tokens=8)
    prompts = {n: prompt(studio, 4 + 3 * i, seed=10 + i) for i, n in enumerate(requests)}
    solo = {}
    for name, request in requests.items():
        final, _ = collect(
            stream_tokens(engine.model, engine.tokenizer, Run(engine.plan(request)), prompts[name], sampling)
        )
        solo[name] = final
    results = {}

    def worker(name):
        results[name] = collect(engine.stream_ids(requests[name], prompts[name], sampling))[0]

    steps_before = engine.scheduler.steps
    threads = {n: threading.Thread(target=worker, args=(n,)) for n in requests}
    for name, thread in threads.items():
        if name != "flow3":
            thread.start()
    deadline = time.time() + 30
    while engine.scheduler.steps < steps_before + 2 and time.time() < deadline:
        time.sleep(0.001)
    threads["flow3"].start()
    for thread in threads.values():
        thread.join(60)
    for name, final in results.items():
        expected = solo[name]
        assert final.token_ids == expected.token_ids, name
        assert final.text == expected.text and final.finish_reason == expected.finish_reason
        assert final.trace.kind == expected.trace.kind and final.trace.tokens == expected.trace.tokens
        torch.testing.assert_close(final.trace.weights, expected.trace.weights, atol=1e-5, rtol=0)
        if expected.trace.chosen is not None:
            assert torch.equal(final.trace.chosen, expected.trace.chosen)
    assert len(results) == len(requests)
    assert engine.scheduler.steps - steps_before < len(requests) * 8, "the rows never shared a step"


def test_seeded_sampling_and_cancel_of_one_row(studio, requests):
    """Each row samples with its own generator (equal to its solo run with the same seed), and
    cancelling one row ends it at once without changing the others."""
    engine = studio.engine
    scheduler = Scheduler(engine.model, engine.tokenizer, merge_static=False)
    cases = [
        ("flow2", Sampling(max_new_tokens=10, temperature=0.9, top_p=0.9, seed=3)),
        ("linear", Sampling(max_new_tokens=10, temperature=1.3, top_k=20, seed=4)),
        ("mixlora", Sampling(max_new_tokens=10, temperature=0.7, seed=5)),
    ]
    ids = prompt(studio, 7, seed=2)
    solo = [
        collect(stream_tokens(engine.model, engine.tokenizer, Run(engine.plan(requests[n])), ids, s))[0]
        for n, s in cases
    ]
    cancel = threading.Event()
    victim = scheduler.stream(engine.plan(requests["cat"]), ids, Sampling(max_new_tokens=50), cancel)
    streams = [scheduler.stream(engine.plan(requests[n]), ids, s) for n, s in cases]
    first = next(victim)  # the victim is decoding before the others join
    finals = [None] * len(streams)
    for i, stream in enumerate(streams):
        for event in stream:
            if i == 0 and len(event.token_ids) == 3:
                cancel.set()
            finals[i] = event
    rest = list(victim)
    assert not first.done and rest[-1].finish_reason == "cancelled" and len(rest[-1].token_ids) < 50
    for final, expected, (name, _) in zip(finals, solo, cases):
        assert final.token_ids == expected.token_ids, name
        assert final.text == expected.text


def never_ending(scheduler):
    """No stop tokens: the rows that block the others must not end by themselves."""
    scheduler.eos, scheduler._eos_of = set(), scheduler.tokenizer


def test_queue_beyond_the_row_cap(studio, requests):
    """With room for two rows, the third request waits (its caller sees queued events with its
    place), then runs once a row leaves; results are unchanged."""
    engine = studio.engine
    scheduler = Scheduler(engine.model, engine.tokenizer, max_rows=2)
    never_ending(scheduler)
    plan = engine.plan(requests["flow2"])
    ids = prompt(studio, 5, seed=3)
    expected = collect(stream_tokens(engine.model, engine.tokenizer, Run(plan), ids, Sampling(max_new_tokens=6)))[0]
    gate = threading.Event()
    blockers = []
    for _ in range(2):
        blocker = scheduler.stream(plan, ids, Sampling(max_new_tokens=1000), gate)  # runs until the gate opens
        next(blocker)
        blockers.append(blocker)
    waiting = scheduler.stream(plan, ids, Sampling(max_new_tokens=6))
    first = next(waiting)
    assert first.queued == 1 and first.text == "" and not first.done
    assert scheduler.status()["queued"] == 1 and scheduler.status()["running"] == 2
    gate.set()
    final = [e for e in waiting if e.done][0]
    assert final.token_ids == expected.token_ids
    for blocker in blockers:
        assert list(blocker)[-1].finish_reason == "cancelled"


def test_kv_budget_queues_rows_that_do_not_fit(studio, requests):
    engine = studio.engine
    blocker = RowCache.bytes_for(engine.model.config, 5 + 1000 + 1, torch.float32)
    waiter = RowCache.bytes_for(engine.model.config, 5 + 40 + 1, torch.float32)
    scheduler = Scheduler(engine.model, engine.tokenizer, kv_budget_bytes=blocker + waiter - 1)
    plan = engine.plan(requests["base"])
    never_ending(scheduler)
    ids = prompt(studio, 5, seed=4)
    gate = threading.Event()
    first = scheduler.stream(plan, ids, Sampling(max_new_tokens=1000), gate)  # runs until the gate opens
    next(first)
    second = scheduler.stream(plan, ids, Sampling(max_new_tokens=40))
    assert next(second).queued == 1
    assert scheduler.status() == {**scheduler.status(), "running": 1, "queued": 1}
    gate.set()
    assert list(first)[-1].finish_reason == "cancelled"
    final = list(second)[-1]
    assert final.done and final.finish_reason == "length" and len(final.token_ids) == 40


def test_merge_only_while_one_static_fusion_is_alone(studio, requests, monkeypatch):
    """A lone static fusion runs merged (its prompt read through the original weights, its
    deltas beside them); while another fusion decodes beside it, both run unmerged; at the end
    the weights are the originals bit for bit."""
    engine = studio.engine
    model = engine.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    scheduler = Scheduler(engine.model, engine.tokenizer, lock=engine._model_lock, merge_static=True)
    import fusion.scheduler as module

    seen = []  # (rows in the step, merged fusion, original weights read)
    original = module.decode_step

    def step(model, layout, tokens, caches, *args, original_weights=False):
        seen.append((len(caches), scheduler.status()["merged"], original_weights))
        return original(model, layout, tokens, caches, *args, original_weights=original_weights)

    monkeypatch.setattr(module, "decode_step", step)
    ids = prompt(studio, 6, seed=5)
    hold = threading.Event()
    never_ending(scheduler)
    lone = scheduler.stream(engine.plan(requests["linear"]), ids, Sampling(max_new_tokens=1000), hold)
    next(lone)
    assert scheduler.status()["merged"] == "linear"
    other = scheduler.stream(engine.plan(requests["flow2"]), ids, Sampling(max_new_tokens=3))
    assert list(other)[-1].finish_reason == "length"
    assert {(merged, read) for rows, merged, read in seen if rows == 2} == {(None, False)}
    assert seen[0] == (1, "linear", True)  # the prompt
    assert all(merged == "linear" and not read for rows, merged, read in seen[1:] if rows == 1)
    hold.set()
    list(lone)
    deadline = time.time() + 10  # the loop restores the weights once it finds itself idle
    while (scheduler.status()["running"] or scheduler.status()["merged"]) and time.time() < deadline:
        time.sleep(0.01)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name


def test_a_prompt_under_a_merge_reads_the_original_weights(studio, requests):
    """Under a merge, `original_weights` reads the weights the merge replaced, and the layout's
    deltas give the fusion: the prompt's logits equal the solo run's; reading the merged
    weights with the same deltas adds them twice."""
    engine, model = studio.engine, studio.engine.model
    plan = engine.plan(requests["linear"])
    ids = prompt(studio, 9, seed=7)
    solo, _ = solo_logits(model, plan, ids, [])
    layout = Layout(model, [plan])
    got = {}
    with merged_into(model, plan):
        for flag in (True, False):
            cache = RowCache.empty(model.config, len(ids), "cpu", torch.float32)
            got[flag] = decode_step(
                model, layout, torch.tensor(ids), [cache], [None], [len(ids)], original_weights=flag
            )
    torch.testing.assert_close(got[True][0], solo[0], atol=1e-4, rtol=0)
    assert (got[False][0] - solo[0]).abs().max() > 1e-2


def test_many_prompts_at_once_come_back_in_order(studio, requests):
    """`finals`: five prompts of different lengths submitted together to a scheduler with room for
    two rows give each prompt's solo reply, in the prompts' order; leaving early cancels the rest."""
    engine = studio.engine
    scheduler = Scheduler(engine.model, engine.tokenizer, max_rows=2)
    plan = engine.plan(requests["flow3"])
    prompts = [prompt(studio, 3 + 2 * i, seed=40 + i) for i in range(5)]
    sampling = Sampling(max_new_tokens=5)
    solo = [
        collect(stream_tokens(engine.model, engine.tokenizer, Run(plan), ids, sampling, record_trace=False))[0]
        for ids in prompts
    ]
    finals = list(scheduler.finals(plan, prompts, sampling))
    assert [f.token_ids for f in finals] == [s.token_ids for s in solo]
    assert [f.text for f in finals] == [s.text for s in solo] and all(f.trace is None for f in finals)

    never_ending(scheduler)
    replies = scheduler.finals(plan, prompts[:3], Sampling(max_new_tokens=200))
    assert len(next(replies).token_ids) == 200  # the third prompt is admitted only now
    at_close = scheduler.steps
    replies.close()
    deadline = time.time() + 30
    while (scheduler.status()["running"] or scheduler.status()["queued"]) and time.time() < deadline:
        time.sleep(0.01)
    assert scheduler.status()["running"] == 0 and scheduler.status()["queued"] == 0
    assert scheduler.steps - at_close < 100, "the rows left behind went on decoding"


def test_decode_threads_are_set_for_the_calling_thread_only(monkeypatch):
    """`local_threads` changes the intra-op threads of its own thread for the body and restores
    them; other threads, and threads started meanwhile, keep torch's setting."""
    from fusion import threads

    if threads._setters() is None:
        pytest.skip("no per-thread OpenMP/MKL setters in this build")
    default = torch.get_num_threads()
    seen = {}

    def other():
        seen["other"] = torch.get_num_threads()

    def worker():
        with threads.local_threads(default + 1):
            seen["inside"] = torch.get_num_threads()
            t = threading.Thread(target=other)
            t.start()
            t.join()
        seen["after"] = torch.get_num_threads()

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen == {"inside": default + 1, "other": default, "after": default}
    assert torch.get_num_threads() == default
    monkeypatch.setenv("LORA_STUDIO_DECODE_THREADS", "3")
    assert threads.decode_threads(torch.device("cpu")) == 3
    monkeypatch.setenv("LORA_STUDIO_DECODE_THREADS", "0")
    assert threads.decode_threads(torch.device("cpu")) is None
    monkeypatch.delenv("LORA_STUDIO_DECODE_THREADS")
    assert threads.decode_threads(torch.device("cpu")) == 1
    assert threads.decode_threads(torch.device("meta")) is None


def test_prompt_tokens_per_forward_are_capped(studio, requests, monkeypatch):
    """Three 6-token prompts submitted together with a cap of 10 prompt tokens a step: no
    forward holds more than one of them (a single prompt over the cap still goes alone), and
    each reply equals its solo run."""
    import fusion.scheduler as module

    engine = studio.engine
    scheduler = Scheduler(engine.model, engine.tokenizer, max_prompt_tokens_per_step=10)
    fed = []  # prompt tokens in each forward
    original = module.decode_step

    def step(model, layout, tokens, caches, runs, counts=None, **kwargs):
        # only this scheduler's forwards: the shared engine's own loop may still be finishing
        # an earlier test's request through the same (patched) function
        if threading.current_thread() is scheduler._thread:
            fed.append(sum(c for c in (counts or []) if c > 1))
        return original(model, layout, tokens, caches, runs, counts, **kwargs)

    monkeypatch.setattr(module, "decode_step", step)
    plan = engine.plan(requests["flow2"])
    prompts = [prompt(studio, 6, seed=s) for s in (1, 2, 3)] + [prompt(studio, 14, seed=4)]
    replies = list(scheduler.finals(plan, prompts, Sampling(max_new_tokens=4)))
    assert max(fed) == 14 and sorted(x for x in fed if x) == [6, 6, 6, 14]
    for ids, reply in zip(prompts, replies):
        solo = collect(stream_tokens(engine.model, engine.tokenizer, Run(plan), ids, Sampling(max_new_tokens=4)))[0]
        assert reply.token_ids == solo.token_ids


def test_close_cancels_rows_and_stops_the_loop(studio, requests):
    """Closing (as at interpreter exit) ends a running and a waiting row as cancelled, restores
    the weights a merged fusion changed, and the loop's thread exits; a later submit is refused."""
    engine = studio.engine
    scheduler = Scheduler(engine.model, engine.tokenizer, max_rows=1, lock=engine._model_lock)
    never_ending(scheduler)
    before = {k: v.clone() for k, v in engine.model.state_dict().items()}
    ids = prompt(studio, 5, seed=4)
    running = scheduler.stream(engine.plan(requests["single"]), ids, Sampling(max_new_tokens=1000))
    next(running)
    assert scheduler.status()["merged"] == "single"
    waiting = scheduler.stream(engine.plan(requests["flow2"]), ids, Sampling(max_new_tokens=5))
    assert next(waiting).queued == 1
    scheduler.close()
    assert not scheduler._thread.is_alive()
    assert list(running)[-1].finish_reason == "cancelled"
    assert list(waiting)[-1].finish_reason == "cancelled"
    after = engine.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(RuntimeError, match="closed"):
        scheduler.submit(engine.plan(requests["base"]), ids, Sampling(max_new_tokens=2))


def test_the_helper_thread_changes_no_bit_of_mixed_steps(studio, requests, monkeypatch):
    """Decoding steps whose deltas run on the C helper thread beside the base projections
    (`native.helper`) give the logits of the same steps computed on the calling thread, bit for
    bit: a prompt step and three decoding steps of nine fusions, MixLoRA and LoRA-Flow included.
    The helper does serve them: the tables and the MixLoRA row post to it."""
    from fusion import native

    if native.helper.current() is None:
        pytest.skip("no helper thread here: one core, or no C compiler")
    engine = studio.engine
    plans = [engine.plan(r) for r in requests.values()]
    prompts = [prompt(studio, 4 + i, seed=i) for i in range(len(plans))]
    native.tables._kernels()  # the kernels' self-checks (which post too) done before counting
    posts = []
    real_post = native.helper.Helper.post

    def counting_post(self, function, ref):
        posts.append(function.value)
        return real_post(self, function, ref)

    monkeypatch.setattr(native.helper.Helper, "post", counting_post)
    got = {}
    for beside in (True, False):
        if not beside:
            monkeypatch.setattr(native.helper, "current", lambda: None)
        layout = Layout(engine.model, plans)
        caches = [RowCache.empty(engine.model.config, 40, "cpu", torch.float32) for _ in plans]
        tokens = torch.tensor([t for p in prompts for t in p])
        steps = [decode_step(engine.model, layout, tokens, caches, [None] * len(plans), [len(p) for p in prompts])]
        for _ in range(3):
            steps.append(decode_step(engine.model, layout, steps[-1].argmax(-1), caches, [None] * len(plans)))
        got[beside] = steps
        if beside:
            kinds = set(posts)
    assert len(kinds) == 2  # table_apply and picked_mixture
    counts = sorted(posts.count(kind) for kind in kinds)
    # per layer: the 4 tables in each of the 3 decoding steps (a prompt step's many rows take MKL),
    # the MixLoRA row in all 4 steps (its 10-token prompt is within the helper's few tokens)
    assert counts == sorted([3 * LAYERS * 4, 4 * LAYERS])
    for with_helper, without in zip(got[True], got[False]):
        assert torch.equal(with_helper, without)
