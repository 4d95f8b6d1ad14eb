"""Soak: a few hundred mixed requests (several fusion methods, one or two new tokens, listings and
some bad inputs) from four clients at once against the app launched on a loopback port. The server
must stay up, every greedy reply must equal the same request's reply run alone, every bad input
must get its one-line error, and resident memory must stop growing once warmed up.

Bounded by count, not by time: exactly REQUESTS requests, so what is checked does not depend on
how fast the machine is; HANG_SECONDS only stops a server that hangs. The figures are printed (run
with -s to see them).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from app_fixtures import MIXLORA, app_engine, app_url  # noqa: F401  (fixtures)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore:.*(no_silent_downcasting|copy keyword)")

REQUESTS = 160  # warm-up included (about 45 s on 2 idle cores)
WARMUP = 40
HANG_SECONDS = 900.0  # twenty times the idle-machine time: past this the server is hung, not slow
MAX_RSS_GROWTH_MB = 150  # measured growth after warm-up: +17 MB (docs/testing.md)
CLIENTS = 4
PROMPTS = ("Name three colours.", "What is 2 + 3?")


@pytest.fixture(scope="module")
def strong(app_engine, tmp_path_factory) -> tuple[str, str]:
    """Two random LoRAs strong enough to change replies, passed by folder path (the shared
    library's listing stays as it is)."""
    from helpers import lora_state, write_lora

    root = tmp_path_factory.mktemp("soak-adapters")
    return tuple(
        str(
            write_lora(
                root / f"soak-{seed}",
                app_engine.model,
                rank=4,
                alpha=8.0,
                state=lora_state(app_engine.model, rank=4, seed=seed, std=0.05),
            )
        )
        for seed in (11, 12)
    )


def good_requests(strong) -> list[tuple]:
    """/generate arguments: (adapters, method, params, prompt, max_new_tokens, temperature)."""
    a, b = strong
    fusions = [
        ([], "base", {}),
        ([a], "single", {}),
        ([a, b], "linear", {"weights": "0.7, 0.3"}),
        ([a, b], "ties", {"density": 0.5}),
        ([a, b], "lorahub", {"weights": "1.2, -0.4"}),
        ([a, b], "cat", {}),
        ([a, b], "lora_flow", {}),
        ([MIXLORA], "mixlora", {}),
    ]
    return [
        (adapters, method, json.dumps(params), prompt, tokens, 0.0)
        for adapters, method, params in fusions
        for prompt, tokens in zip(PROMPTS, (1, 2))
    ]


BAD_REQUESTS = [  # /generate arguments and a fragment of the expected error
    (("lang-es", "no_such_method", "{}", "Hi", 1, 0.0), "unknown fusion method"),
    (("lang-es,task-math", "linear", "{}", "\x00\x01", 1, 0.0), "empty"),
    (("lang-es,task-math", "linear", "{oops", "Hi", 1, 0.0), "JSON object"),
    (("lang-es,task-math", "linear", "{}", "Hi", 0, 0.0), "max_new_tokens"),
    (("lang-es,nope", "linear", "{}", "Hi", 1, 0.0), "nope"),
    (("lang-es,task-math", "linear", "{}", "x" * 100_000, 1, 0.0), "limit"),
]


def rss_mb() -> tuple[float, float]:
    """Resident memory of this process (server and clients) in MB: as it is, and after asking the
    C allocator to give its cached free pages back (glibc's malloc_trim; where there is none, the
    same figure twice). Requests that merge a static fusion allocate a fresh copy of the touched
    weights and glibc's per-thread arenas keep such freed blocks, so the first figure swings by
    hundreds of MB from one moment to the next; the second is what the process really holds."""
    psutil = pytest.importorskip("psutil")
    gc.collect()
    process = psutil.Process()
    raw = process.memory_info().rss / 2**20
    libc_name = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(libc_name), "malloc_trim", None) if libc_name else None
    if trim is None:
        return raw, raw
    trim(0)
    return raw, process.memory_info().rss / 2**20


def test_soak_mixed_requests_stay_correct_and_memory_levels_off(app_engine, app_url, strong):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    goods = good_requests(strong)
    alone = Client(app_url, verbose=False)
    solo = {i: alone.predict(*args, api_name="/generate")["text"] for i, args in enumerate(goods)}

    picker = random.Random(0)
    schedule = []  # (kind, index)
    for _ in range(REQUESTS):
        roll = picker.random()
        schedule.append(
            ("bad", picker.randrange(len(BAD_REQUESTS)))
            if roll < 0.12
            else ("list", picker.randrange(2))
            if roll < 0.2
            else ("good", picker.randrange(len(goods)))
        )

    clients = [Client(app_url, verbose=False) for _ in range(CLIENTS)]
    lock = threading.Lock()
    position = {"next": 0}
    outcomes: list[tuple[str, int, object]] = []
    began = time.perf_counter()

    def run(client, upto: int) -> None:
        while True:
            with lock:
                index = position["next"]
                if index >= upto or time.perf_counter() - began > HANG_SECONDS:
                    return
                position["next"] += 1
            kind, which = schedule[index]
            try:
                if kind == "good":
                    result = client.predict(*goods[which], api_name="/generate")["text"]
                elif kind == "list":
                    result = client.predict(api_name=("/methods", "/adapters")[which])
                else:
                    client.predict(*BAD_REQUESTS[which][0], api_name="/generate")
                    result = AssertionError("a bad request was accepted")
            except AppError as exc:
                result = exc
            except Exception as exc:  # recorded; the assertions below report it
                result = exc
            with lock:
                outcomes.append((kind, which, result))

    def batch(upto: int) -> None:
        with ThreadPoolExecutor(CLIENTS) as pool:
            for future in [pool.submit(run, client, upto) for client in clients]:
                future.result()

    batch(WARMUP)
    warm_seconds = time.perf_counter() - began
    raw_warm, rss_warm = rss_mb()
    batch(REQUESTS)
    seconds = time.perf_counter() - began
    raw_end, rss_end = rss_mb()
    done = len(outcomes)
    print(
        f"\nsoak: {done} requests ({WARMUP} warm-up in {warm_seconds:.1f} s) in {seconds:.1f} s, "
        f"{done / seconds:.1f}/s with {CLIENTS} clients; RSS after warm-up {rss_warm:.0f} MB "
        f"({raw_warm:.0f} before trimming), at the end {rss_end:.0f} MB ({raw_end:.0f}): "
        f"{rss_end - rss_warm:+.0f} MB"
    )

    for kind, which, result in outcomes:
        if kind == "good":
            assert result == solo[which], f"{goods[which][1]} on {goods[which][3]!r}: {result!r} != {solo[which]!r}"
        elif kind == "list":
            assert isinstance(result, (list, dict)), result
        else:
            assert isinstance(result, AppError), result
            message = str(result)
            assert BAD_REQUESTS[which][1] in message and "Traceback" not in message and "\n" not in message.strip()
    assert done == REQUESTS, f"the server hung: {done} of {REQUESTS} requests in {seconds:.0f} s"
    assert {kind for kind, _, _ in outcomes} == {"good", "bad", "list"}
    assert rss_end - rss_warm < MAX_RSS_GROWTH_MB
    # Still up and still right after the soak.
    assert alone.predict(*goods[0], api_name="/generate")["text"] == solo[0]
