"""Engine replicas on a local Ray Serve cluster (2 CPU replicas over the shipped skill library):
requests spread over both and equal the in-process engine's; a replica killed mid-reply does not
take the client down; the app runs on the backend. Also the client's errors without Ray."""

from __future__ import annotations

import inspect
import json
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from app_fixtures import free_port

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fusion.api import Backend, RequestInfo  # noqa: E402
from fusion.engine import Engine, FusionRequest  # noqa: E402
from fusion.errors import FusionError  # noqa: E402
from fusion.generate import Sampling  # noqa: E402
from fusion.remote import RemoteEngine  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
ADAPTERS = REPO / "assets" / "adapters"
FUSIONS = REPO / "assets" / "fusions"

REQUESTS = [
    FusionRequest(fusion="es-math-flow"),
    FusionRequest(adapters=["lang-es", "task-math"], method="linear"),
    FusionRequest(adapters=["lang-es", "task-math"], method="ties"),
    FusionRequest(adapters=["task-math"], method="single"),
    FusionRequest(method="base"),
    FusionRequest(adapters=["lang-ru", "task-math"], method="lora_flow"),
]
PROMPT = "Ana tiene 14 lápices y compra 9 más. ¿Cuántos lápices tiene ahora?"


def test_unreachable_backend_is_one_clear_line():
    port = free_port()  # nothing listens there
    with pytest.raises(FusionError, match=rf"backend at http://127.0.0.1:{port} did not answer") as info:
        RemoteEngine(f"http://127.0.0.1:{port}", retries=1, retry_wait=0.05)
    assert "\n" not in str(info.value)
    with pytest.raises(FusionError, match="http"):
        RemoteEngine("ftp://somewhere")


@pytest.fixture(scope="module")
def local():
    engine = Engine(model="default", adapters_dir=ADAPTERS, fusions_dir=FUSIONS, progress=lambda *a: None)
    torch.set_num_threads(1)
    return engine


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """A copy of the shipped library that a test may add to while the replicas serve it."""
    root = tmp_path_factory.mktemp("served")
    shutil.copytree(ADAPTERS, root / "adapters")
    shutil.copytree(FUSIONS, root / "fusions")
    return root


@pytest.fixture(scope="module")
def backend(library):
    pytest.importorskip("ray.serve", reason="ray[serve] is in requirements-scale.txt")
    from fusion import serve

    options = {
        "model": "default",
        "adapters_dir": str(library / "adapters"),
        "fusions_dir": str(library / "fusions"),
        "threads": 1,
    }
    url = serve.start(2, options, port=free_port(), cpus_per_replica=1.0, num_cpus=2)
    try:
        yield url
    finally:
        serve.stop()


def replicas_answering(url: str, tries: int = 40) -> set[str]:
    remote = RemoteEngine(url)
    return {remote._get("/info")["replica"] for _ in range(tries)}


def test_concurrent_requests_spread_over_both_replicas_and_equal_in_process(backend, local):
    remote = RemoteEngine(backend)
    sampling = Sampling(max_new_tokens=16)
    jobs = REQUESTS * 2

    def one(request):
        return remote.generate(request, PROMPT, sampling)

    with ThreadPoolExecutor(len(jobs)) as pool:
        events = list(pool.map(one, jobs))
    assert len({e.replica for e in events}) == 2, [e.replica for e in events]
    for request, event in zip(jobs, events):
        want = local.generate(request, PROMPT, sampling)
        assert event.token_ids == want.token_ids, request
        assert event.text == want.text
        assert event.done and event.finish_reason == want.finish_reason
        assert event.trace.shape == want.trace.shape
        assert event.trace.slot_names == want.trace.slot_names
        torch.testing.assert_close(event.trace.weights, want.trace.weights, atol=1e-4, rtol=0)


def test_library_and_methods_come_from_the_replicas(backend, local):
    remote = RemoteEngine(backend)
    assert [a["name"] for a in remote.adapters()] == [a["name"] for a in local.adapters()]
    assert [f["name"] for f in remote.fusions()] == [f["name"] for f in local.fusions()]
    assert [m["name"] for m in remote.methods()] == [m["name"] for m in local.methods()]
    assert remote.describe(FusionRequest(fusion="es-math-flow")) == RequestInfo(
        "lora_flow", ["lang-es", "task-math"], "es-math-flow"
    )
    assert remote.base_info() == local.base_info()


def test_a_fusion_saved_on_the_host_reaches_every_replica(backend, library, local):
    remote = RemoteEngine(backend, library_ttl=0)
    assert "es-math-flow-2" not in {f["name"] for f in remote.fusions()}
    staging = library / "fusions" / ".staging"
    shutil.copytree(library / "fusions" / "es-math-flow", staging)
    doc = json.loads((staging / "fusion.json").read_text(encoding="utf-8"))
    (staging / "fusion.json").write_text(json.dumps({**doc, "name": "es-math-flow-2"}), encoding="utf-8")
    staging.rename(library / "fusions" / "es-math-flow-2")  # as the studio's atomic saves do
    assert "es-math-flow-2" in {f["name"] for f in remote.fusions()}
    sampling = Sampling(max_new_tokens=6)
    with ThreadPoolExecutor(6) as pool:
        events = list(
            pool.map(lambda _: remote.generate(FusionRequest(fusion="es-math-flow-2"), PROMPT, sampling), range(6))
        )
    want = local.generate(FusionRequest(fusion="es-math-flow"), PROMPT, sampling)
    assert len({e.replica for e in events}) == 2
    assert all(e.token_ids == want.token_ids for e in events)


def test_bad_requests_get_the_engines_message(backend):
    remote = RemoteEngine(backend)
    with pytest.raises(FusionError, match="no-such-lora"):
        remote.generate(FusionRequest(adapters=["no-such-lora"], method="single"), PROMPT)
    with pytest.raises(FusionError, match="empty"):
        remote.generate(FusionRequest(), "   ")
    # the library changes where it lives: a client refuses to, and nothing changes
    with pytest.raises(FusionError, match="serving host"):
        remote.fit("cat", ["lang-es", "task-math"], [])
    with pytest.raises(FusionError, match="serving host"):
        remote.remove("es-math-flow", "fusion")
    with pytest.raises(FusionError, match="serving host"):
        remote.import_adapter(str(ADAPTERS / "lang-es"), name="lang-es-2")
    assert "es-math-flow" in {f["name"] for f in remote.fusions()}
    assert "lang-es-2" not in {a["name"] for a in remote.adapters()}
    # the replicas keep serving
    assert remote.generate(FusionRequest(), PROMPT, Sampling(max_new_tokens=2)).done


def test_cancel_stops_a_remote_reply(backend):
    remote = RemoteEngine(backend)
    cancel = threading.Event()
    events = []
    for event in remote.stream(
        FusionRequest(fusion="es-math-flow"), PROMPT, Sampling(max_new_tokens=200), cancel=cancel
    ):
        events.append(event)
        if len(events) == 3:
            cancel.set()
    assert events[-1].done and events[-1].finish_reason == "cancelled"
    assert len(events[-1].token_ids) < 10


def test_replica_killed_mid_reply_fails_over_then_serves_again(backend, local):
    import ray

    remote = RemoteEngine(backend, retry_wait=1.0, retries=5)
    request = FusionRequest(fusion="es-math-flow")
    sampling = Sampling(max_new_tokens=60)
    want = local.generate(request, PROMPT, sampling)
    seen, killed = [], None
    for event in remote.stream(request, PROMPT, sampling):
        seen.append(event)
        if killed is None and len(event.token_ids) == 3:
            killed = event.replica
            names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].endswith(killed)]
            assert len(names) == 1, names
            ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=False)
    assert killed is not None
    final = seen[-1]
    assert final.done and final.replica != killed
    assert final.token_ids == want.token_ids and final.text == want.text
    # afterwards every request succeeds, and Serve brings the deployment back to two replicas
    for _ in range(3):
        assert remote.generate(request, PROMPT, Sampling(max_new_tokens=4)).done
    deadline = time.monotonic() + 120
    while len(replicas_answering(backend)) < 2:
        assert time.monotonic() < deadline, "the killed replica was not replaced"
        time.sleep(2)


def test_app_runs_on_the_backend(backend, local):
    from app_fixtures import running_app
    from gradio_client import Client

    from app import open_engine, parse_args

    engine = open_engine(parse_args(["--backend", backend]))
    assert isinstance(engine, RemoteEngine)
    with running_app(engine) as (_, url):
        client = Client(url, verbose=False)
        got = client.predict(
            adapters=[],
            method="",
            params="{}",
            prompt=PROMPT,
            max_new_tokens=12,
            temperature=0.0,
            fusion="es-math-flow",
            system="",
            api_name="/generate",
        )
        listing = client.predict(api_name="/adapters")
    want = local.generate(FusionRequest(fusion="es-math-flow"), PROMPT, Sampling(max_new_tokens=12))
    assert got["text"] == want.text and got["method"] == "lora_flow"
    assert got["trace"]["shape"] == list(want.trace.shape)
    assert {a["name"] for a in listing["adapters"]} >= {"lang-es", "task-math"}


# ---- one declared interface, two implementations ----------------------------------------------------
@pytest.fixture(params=["in-process", "remote"])
def either(request, local):
    """(backend, the fusions folder it serves): tests above add to the replicas' copy."""
    if request.param == "in-process":
        return local, FUSIONS
    return RemoteEngine(request.getfixturevalue("backend")), request.getfixturevalue("library") / "fusions"


def test_both_backends_implement_the_declared_interface(either):
    either, _ = either
    assert isinstance(either, Backend)
    operations = [name for name, value in vars(Backend).items() if callable(value) and not name.startswith("_")]
    assert len(operations) == 13, operations
    for name in operations:
        declared, implemented = getattr(Backend, name), getattr(type(either), name)
        if name != "generate":  # the one operation written once, over stream
            assert implemented is not declared, f"{type(either).__name__}.{name} is not implemented"
        want = [(p.name, p.kind, p.default) for p in inspect.signature(declared).parameters.values()]
        got = [(p.name, p.kind, p.default) for p in inspect.signature(implemented).parameters.values()]
        assert got == want, name
    # deleting is done where the library lives; an unknown entry is refused either way
    with pytest.raises(FusionError, match="no fusion named 'no-such-fusion'|serving host"):
        either.remove("no-such-fusion", "fusion")


def greedy_reference(engine: Engine, prompt: str, tokens: int) -> list[int]:
    """Greedy decoding by full forwards of the plain base model (no cache, no fusion run)."""
    ids = torch.tensor([engine.encode_messages(prompt)])
    out = []
    with torch.no_grad():
        for _ in range(tokens):
            token = int(engine.model(input_ids=ids, use_cache=False).logits[0, -1].argmax())
            out.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], 1)
    return out


def test_both_backends_give_the_same_answers(either, local):
    either, fusions = either
    config = local.model.config
    info = either.base_info()
    assert (info.num_layers, info.hidden_size, info.device, info.dtype) == (
        config.num_hidden_layers,
        config.hidden_size,
        "cpu",
        "float32",
    )
    assert info.name == local.base.name
    assert [a["name"] for a in either.adapters()] == sorted(p.name for p in ADAPTERS.iterdir())
    assert [f["name"] for f in either.fusions()] == sorted(p.name for p in fusions.iterdir())
    assert either.library_errors() == {}
    assert either.rescan() is None and len(either.fusions()) == len(list(fusions.iterdir()))
    assert either.describe(FusionRequest(fusion="es-math-flow")) == RequestInfo(
        "lora_flow", ["lang-es", "task-math"], "es-math-flow"
    )
    assert either.describe(FusionRequest(["lang-es"], "base")) == RequestInfo("base", [], None)
    with pytest.raises(FusionError, match="no-such-method"):
        either.describe(FusionRequest(["lang-es"], "no-such-method"))
    with pytest.raises(FusionError, match="no-such-lora"):
        either.generate(FusionRequest(adapters=["no-such-lora"], method="single"), PROMPT)

    sampling = Sampling(max_new_tokens=8)
    base = either.generate(FusionRequest(), PROMPT, sampling)
    assert base.finish_reason == "length" and base.token_ids == greedy_reference(local, PROMPT, 8)
    pieces = [e.delta for e in either.stream(FusionRequest(), PROMPT, sampling, trace=False)]
    assert "".join(pieces) == base.text

    linear = either.generate(FusionRequest(["lang-es", "task-math"], "linear"), PROMPT, sampling)
    prompt_tokens = len(local.encode_messages(PROMPT))
    assert linear.prompt_tokens == prompt_tokens
    assert linear.trace.shape == (prompt_tokens + len(linear.token_ids), config.num_hidden_layers, 2)
    assert linear.trace.slot_names == ["lang-es", "task-math"]
    assert torch.equal(linear.trace.weights, torch.full(linear.trace.shape, 0.5))

    flow_request = FusionRequest(fusion="es-math-flow")
    flow, want = either.generate(flow_request, PROMPT, sampling), local.generate(flow_request, PROMPT, sampling)
    assert flow.token_ids == want.token_ids and flow.text == want.text
    assert flow.trace.kind == "gate" and flow.trace.shape == want.trace.shape
    torch.testing.assert_close(flow.trace.weights, want.trace.weights, atol=1e-4, rtol=0)
