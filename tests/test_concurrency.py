"""Isolation under concurrency: many callers with different fusions at once each get exactly the
reply they get alone, through the web app's API and straight through the engine; the app's queue
is bounded and a full queue answers at once with an error instead of hanging.

The app runs on the real embedded base model (tests/app_fixtures.py). The fusions here use two
LoRAs and a MixLoRA strong enough that the fusions give different replies (so a leak between
requests would change a reply); they are passed by folder path, so the shared library's listing
is untouched.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from app_fixtures import app_engine, app_url, free_port  # noqa: F401  (fixtures)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore:.*(no_silent_downcasting|copy keyword)")

PROMPT = "Name three colours."
APP_NEW_TOKENS = 6
ENGINE_NEW_TOKENS = 6
STRONG_STD = 0.05  # std of the random LoRA factors: the fusions' greedy replies differ from each other


@pytest.fixture(scope="module")
def strong(app_engine, tmp_path_factory) -> dict[str, str]:
    """Folders of two strong random LoRAs ("a", "b") and a strong random MixLoRA ("moe")."""
    from helpers import lora_state, write_lora
    from mixlora_helpers import mixlora_config, mixlora_state, write_mixlora

    root = tmp_path_factory.mktemp("strong-adapters")
    model = app_engine.model
    folders = {}
    for name, seed in (("a", 11), ("b", 12)):
        folders[name] = str(
            write_lora(
                root / f"strong-{name}",
                model,
                rank=4,
                alpha=8.0,
                state=lora_state(model, rank=4, seed=seed, std=STRONG_STD),
            )
        )
    folders["moe"] = str(
        write_mixlora(
            root / "strong-moe",
            mixlora_config("default", num_experts=4, top_k=2, rank=4, alpha=8),
            mixlora_state(model, num_experts=4, rank=4, seed=5, std=STRONG_STD),
            fmt="safetensors",
        )
    )
    return folders


def fusion_cases(strong: dict[str, str]) -> list[tuple[str, list[str], dict]]:
    """(method, adapters, params): eight different fusions, static (LoraHub and CAT with given or
    default weights) and dynamic."""
    a, b = strong["a"], strong["b"]
    return [
        ("base", [], {}),
        ("single", [a], {}),
        ("linear", [a, b], {"weights": "0.7, 0.3"}),
        ("ties", [a, b], {"density": 0.5}),
        ("lorahub", [a, b], {"weights": "1.2, -0.4"}),
        ("cat", [a, b], {}),
        ("lora_flow", [a, b], {}),
        ("mixlora", [strong["moe"]], {}),
    ]


def api_args(case, new_tokens: int = APP_NEW_TOKENS) -> tuple:
    method, adapters, params = case
    return adapters, method, json.dumps(params), PROMPT, new_tokens, 0.0


class Overlap:
    """Wraps an engine's stream_ids to record how many generations ran at the same time."""

    def __init__(self, engine, monkeypatch):
        self.active = self.peak = 0
        self._lock = threading.Lock()
        original = engine.stream_ids

        def counted(*args, **kwargs):
            with self._lock:
                self.active += 1
                self.peak = max(self.peak, self.active)
            try:
                yield from original(*args, **kwargs)
            finally:
                with self._lock:
                    self.active -= 1

        monkeypatch.setattr(engine, "stream_ids", counted)


# ---- through the web app ---------------------------------------------------------------------
def test_eight_clients_with_different_fusions_get_their_solo_replies(app_engine, app_url, strong, monkeypatch):
    from gradio_client import Client

    cases = fusion_cases(strong)
    alone = Client(app_url, verbose=False)
    solo = [alone.predict(*api_args(case), api_name="/generate") for case in cases]
    assert len({out["text"] for out in solo}) >= 5, "the fusions must differ for a leak to show"

    clients = [Client(app_url, verbose=False) for _ in cases]
    overlap = Overlap(app_engine, monkeypatch)
    start = threading.Barrier(len(cases))

    def user(index: int) -> list[dict]:
        start.wait(timeout=120)
        return [clients[index].predict(*api_args(cases[index]), api_name="/generate") for _ in range(2)]

    began = time.perf_counter()
    with ThreadPoolExecutor(len(cases)) as pool:
        together = list(pool.map(user, range(len(cases))))
    seconds = time.perf_counter() - began
    print(f"\n{2 * len(cases)} concurrent /generate calls in {seconds:.1f} s, at most {overlap.peak} at once")

    assert overlap.peak >= 2, "the requests never ran at the same time"
    for case, replies, reference in zip(cases, together, solo):
        for reply in replies:
            assert reply["text"] == reference["text"], f"{case[0]} changed under concurrency"
            assert reply["method"] == case[0] and reply["trace"] == reference["trace"]


# ---- straight through the engine ---------------------------------------------------------------
def engine_result(engine, case) -> tuple[str, torch.Tensor | None, torch.Tensor]:
    """A streamed greedy reply with its trace weights, and the logits of one full forward."""
    from fusion.engine import FusionRequest
    from fusion.generate import Sampling

    method, adapters, params = case
    request = FusionRequest(adapters, method, params)
    final = None
    for final in engine.stream(request, PROMPT, Sampling(max_new_tokens=ENGINE_NEW_TOKENS, temperature=0.0)):
        pass
    logits, _ = engine.logits(request, torch.tensor([engine.encode_messages(PROMPT)]))
    return final.text, None if final.trace is None else final.trace.weights.clone(), logits[0, -1].clone()


@pytest.mark.parametrize("merge_static", ["never", "auto"])
def test_eight_engine_streams_at_once_equal_their_solo_runs(app_engine, strong, merge_static, monkeypatch):
    from fusion.engine import Engine

    if merge_static == "auto":
        engine = app_engine
    else:  # the same loaded model and library folders; this test is the model's only user meanwhile
        engine = Engine(
            base=app_engine.base,
            adapters_dir=app_engine.library.adapters_dir,
            fusions_dir=app_engine.library.fusions_dir,
            merge_static="never",
        )
    assert engine.merge_static == merge_static
    cases = fusion_cases(strong)
    solo = [engine_result(engine, case) for case in cases]
    assert len({text for text, _, _ in solo}) >= 5, "the fusions must differ for a leak to show"
    overlap = Overlap(engine, monkeypatch)
    start = threading.Barrier(len(cases))

    def worker(case):
        start.wait(timeout=120)
        return engine_result(engine, case)

    with ThreadPoolExecutor(len(cases)) as pool:
        together = list(pool.map(worker, cases))
    assert overlap.peak >= 2
    for case, (text, weights, logits), (solo_text, solo_weights, solo_logits) in zip(cases, together, solo):
        assert text == solo_text, f"{case[0]} changed under concurrency"
        # Each request's gate/router weights come from its own hidden states, whatever ran beside
        # it; decoding in a batch of another size changes only the float rounding of the matmuls.
        assert (weights is None) == (solo_weights is None)
        if weights is not None:
            torch.testing.assert_close(weights, solo_weights, atol=1e-5, rtol=0, msg=f"{case[0]}'s trace changed")
        assert torch.equal(logits, solo_logits), f"{case[0]}'s logits changed under concurrency"


# ---- the queue -------------------------------------------------------------------------------------
def test_the_app_queue_is_bounded(app_engine):
    from app import build_app
    from ui.constants import APP

    demo = build_app(app_engine)
    assert isinstance(APP.concurrency, int) and APP.concurrency >= 1
    assert isinstance(APP.queue_size, int) and APP.queue_size >= 1
    assert demo._queue.default_concurrency_limit == APP.concurrency
    assert demo._queue.max_size == APP.queue_size
    by_name = {fn.api_name: fn for fn in demo.fns.values()}
    assert by_name["fit"].concurrency_limit == 1  # one training at a time
    assert by_name["generate"].concurrency_id == by_name["compare"].concurrency_id  # share the generation slots


def test_a_full_queue_answers_at_once_with_an_error(app_engine, monkeypatch):
    """One running and one waiting request fill a queue of size 1; a third gets 'queue is full'
    at once, and the first two then finish with their normal replies."""
    from gradio_client import Client
    from gradio_client.utils import QueueError

    import app as app_module
    from ui.common import CSS, theme

    args = ("", "base", "{}", "Hi", 1, 0.0)
    monkeypatch.setattr(app_module, "APP", dataclasses.replace(app_module.APP, concurrency=1, queue_size=1))
    demo = app_module.build_app(app_engine)
    started, release = threading.Event(), threading.Event()
    original = app_engine.generate

    def held(*a, **k):  # the running request waits here until the test lets it go (bounded)
        started.set()
        release.wait(timeout=60)
        return original(*a, **k)

    port = free_port()
    try:
        demo.launch(
            server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, theme=theme(), css=CSS
        )
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        expected = client.predict(*args, api_name="/generate")["text"]
        monkeypatch.setattr(app_engine, "generate", held)
        running = client.submit(*args, api_name="/generate")
        assert started.wait(timeout=30)
        waiting = client.submit(*args, api_name="/generate")
        deadline = time.monotonic() + 30
        while len(demo._queue) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(demo._queue) == 1
        began = time.perf_counter()
        with pytest.raises(QueueError, match="[Qq]ueue is full"):
            client.predict(*args, api_name="/generate")
        assert time.perf_counter() - began < 5
        release.set()
        assert running.result(timeout=60)["text"] == expected
        assert waiting.result(timeout=60)["text"] == expected
    finally:
        release.set()
        demo.close()
