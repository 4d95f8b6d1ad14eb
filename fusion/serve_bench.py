"""`python -m fusion serve-bench --backend URL`: requests/s and tokens/s of running replicas.

Sends `--requests` chat requests, `--concurrency` at a time, through `RemoteEngine` (the same
client the app uses) and reports throughput, latency and how the requests spread over replicas.
"""

from __future__ import annotations

import json
import statistics
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from .engine import FusionRequest
from .generate import Sampling
from .remote import RemoteEngine

PROMPTS = [
    "Ana tiene 14 lápices y compra 9 más. ¿Cuántos lápices tiene ahora?",
    "Write a short story about a lighthouse keeper who finds a map.",
    "Explain in a few sentences why the sky is blue.",
    "Un tren lleva 36 pasajeros y bajan 12. ¿Cuántos quedan?",
]


def run(
    backend: str,
    requests: int = 16,
    concurrency: int = 4,
    tokens: int = 64,
    adapters: str = "lang-es,task-math",
    method: str = "lora_flow",
) -> dict:
    remote = RemoteEngine(backend)
    request = FusionRequest(adapters=[a for a in adapters.split(",") if a], method=method)
    sampling = Sampling(max_new_tokens=tokens)
    remote.generate(request, "warm-up", Sampling(max_new_tokens=4), trace=False)

    def one(i):
        start = time.perf_counter()
        event = remote.generate(request, PROMPTS[i % len(PROMPTS)], sampling, trace=False)
        return time.perf_counter() - start, len(event.token_ids), event.replica

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - start
    latencies = [r[0] for r in results]
    new_tokens = sum(r[1] for r in results)
    return {
        "backend": backend,
        "replicas_seen": len({r[2] for r in results}),
        "spread": dict(Counter(r[2] for r in results)),
        "requests": requests,
        "concurrency": concurrency,
        "method": method,
        "adapters": adapters,
        "max_new_tokens": tokens,
        "wall_s": round(wall, 2),
        "requests_per_s": round(requests / wall, 3),
        "tokens_per_s": round(new_tokens / wall, 2),
        "new_tokens": new_tokens,
        "latency_median_s": round(statistics.median(latencies), 2),
        "latency_max_s": round(max(latencies), 2),
    }


def main(args) -> int:
    result = run(args.backend, args.requests, args.concurrency, args.tokens, args.adapters, args.method)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"{result['requests']} requests ({result['concurrency']} at a time, {result['method']} over "
            f"{result['adapters']}, ≤{result['max_new_tokens']} tokens): {result['requests_per_s']} req/s, "
            f"{result['tokens_per_s']} tok/s, median latency {result['latency_median_s']} s, "
            f"replicas used {result['replicas_seen']} {result['spread']}"
        )
    return 0
