"""`python -m fusion bench --concurrency 1,8,16`: many users at once, each with their own fusion.

For each number of concurrent streams, in one process on one base model: every stream is a
chat request with a different fusion (static, LoRA-Flow, MixLoRA, ...), a prompt of its own
length and its own token budget. The same streams run (1) one thread per request decoding at
batch 1 (the engine's path before continuous batching: `generate.stream_tokens`, a static
fusion merged while the model is idle), (2) through the scheduler (`Engine.stream_ids`), and
(3) the scheduler with every stream on the plain base model, the ceiling a mixed batch is
compared with. Reported: aggregate new tokens/s, the ratios, and the median gap between a
stream's tokens. Stop tokens are off, so every stream decodes exactly its budget on both paths.
Random LoRAs (and an 8-expert top-2 MixLoRA) of the base model's shape are written to a
temporary folder, as in `fusion bench`.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

from .bench import NoStopTokenizer
from .engine import Engine, FusionRequest
from .generate import Sampling, stream_tokens
from .random_adapters import write_random_lora, write_random_mixlora
from .runtime import Run, merged_into

TOPICS = [
    "a lighthouse keeper who finds a map",
    "why the sky is blue",
    "a robot learning to paint",
    "the history of the bicycle",
    "a dragon who learns to count",
    "how bread rises",
    "a city under the sea",
    "the first winter of a young fox",
]


def fusion_mix(loras: list[str], mixlora: str) -> list[tuple[str, FusionRequest]]:
    """Sixteen different fusions; the first one is the single stream's."""
    a, b, c, d = loras
    return [
        ("lora_flow k=2", FusionRequest([a, b], "lora_flow")),
        ("linear k=2", FusionRequest([a, b], "linear", {"weights": [0.6, 0.4]})),
        ("cat k=2", FusionRequest([b, c], "cat")),
        ("mixlora 8x top-2", FusionRequest([mixlora], "mixlora")),
        ("ties k=2", FusionRequest([a, c], "ties", {"density": 0.5})),
        ("single", FusionRequest([b], "single")),
        ("lora_flow k=3", FusionRequest([a, b, c], "lora_flow")),
        ("lorahub k=2", FusionRequest([c, d], "lorahub", {"weights": [0.7, 0.3]})),
        ("linear k=4", FusionRequest([a, b, c, d], "linear")),
        ("lora_flow k=2 (b)", FusionRequest([c, d], "lora_flow")),
        ("dare_linear k=2", FusionRequest([b, d], "dare_linear", {"density": 0.7})),
        ("single (b)", FusionRequest([d], "single")),
        ("cat k=3", FusionRequest([a, c, d], "cat")),
        ("magnitude_prune k=2", FusionRequest([a, d], "magnitude_prune", {"density": 0.6})),
        ("lora_flow k=4", FusionRequest([a, b, c, d], "lora_flow")),
        ("linear k=2 (b)", FusionRequest([b, d], "linear", {"weights": [1.0, 0.5]})),
    ]


def thread_per_request(engine: Engine, request: FusionRequest, ids: list[int], sampling: Sampling):
    """Decoding as it was before the scheduler: the caller's thread, batch 1, its own forwards."""
    plan = engine.plan(request)
    lock = engine._model_lock
    if plan.is_static and plan.deltas and lock.try_exclusive():
        try:
            with merged_into(engine.model, plan) as merged:
                yield from stream_tokens(engine.model, engine.tokenizer, Run(merged), ids, sampling, None, False)
        finally:
            lock.release_exclusive()
        return
    with lock.shared():
        yield from stream_tokens(engine.model, engine.tokenizer, Run(plan), ids, sampling, None, False)


def _run_streams(streams, start_stream) -> dict:
    """streams: (request, prompt ids, sampling); start_stream -> an event iterator."""
    gaps: list[float] = []
    tokens = [0] * len(streams)
    barrier = threading.Barrier(len(streams) + 1)
    lock = threading.Lock()

    def one(i):
        request, ids, sampling = streams[i]
        barrier.wait()
        last, seen, mine = time.perf_counter(), 0, []
        for event in start_stream(request, ids, sampling):
            now = time.perf_counter()
            new = len(event.token_ids) - seen
            if new > 0:
                if seen:  # gaps between tokens, not the wait for the first one
                    mine += [(now - last) / new] * new
                seen, last = len(event.token_ids), now
        tokens[i] = seen
        with lock:
            gaps.extend(mine)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(streams))]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {
        "tokens": sum(tokens),
        "wall_s": round(wall, 3),
        "tokens_per_s": round(sum(tokens) / wall, 2),
        "p50_inter_token_s": round(statistics.median(gaps), 4) if gaps else None,
    }


def run_concurrency_bench(
    model: str = "default",
    device: str = "cpu",
    dtype: str = "float32",
    concurrency: tuple[int, ...] = (1, 8, 16),
    token_range: tuple[int, int] = (64, 128),
    rank: int = 8,
    log=print,
    rounds: int = 1,
) -> dict:
    scratch = Path(tempfile.mkdtemp(prefix="fusion-batch-bench-"))
    engine = Engine(
        model=model,
        device=device,
        dtype=dtype,
        adapters_dir=scratch / "adapters",
        fusions_dir=scratch / "fusions",
        progress=log,
    )
    names = ["lang", "task", "task2", "task3"]
    for i, name in enumerate(names):
        write_random_lora(scratch / "adapters" / name, engine.model, rank=rank, seed=i)
    write_random_mixlora(scratch / "adapters" / "mix", engine.model, engine.base.info.get("source") or "", rank=rank)
    engine.library.rescan()
    mix = fusion_mix(names, "mix")
    low, high = token_range
    streams = []
    for i in range(max(concurrency)):
        label, request = mix[i % len(mix)]
        words = " ".join(["Please be detailed."] * (i % 5))
        ids = engine.encode_messages(f"Write about {TOPICS[i % len(TOPICS)]}. {words}".strip())
        budget = low + (i * 37) % (high - low + 1)
        streams.append((label, request, ids, Sampling(max_new_tokens=budget)))
    engine.tokenizer = NoStopTokenizer(engine.tokenizer)
    engine.model.generation_config.eos_token_id = None
    for _label, request, ids, _ in streams[: len(mix)]:  # build every plan and warm up both paths once
        for _ in thread_per_request(engine, request, ids, Sampling(max_new_tokens=2)):
            pass
        for _ in engine.stream_ids(request, ids, Sampling(max_new_tokens=2), trace=False):
            pass
    base = FusionRequest()
    paths = {
        "thread_per_request": ("thread per request", lambda r, ids, s: thread_per_request(engine, r, ids, s)),
        "scheduler": ("scheduler", lambda r, ids, s: engine.stream_ids(r, ids, s, trace=False)),
        "scheduler_base_only": (
            "scheduler, base model only",
            lambda r, ids, s: engine.stream_ids(base, ids, s, trace=False),
        ),
    }
    rows = []
    for n in concurrency:
        chosen = [(r, ids, s) for _, r, ids, s in streams[:n]]
        measured = []  # per round: path -> result
        for round_ in range(rounds):
            # the two scheduler runs are adjacent in every round; odd rounds run in reverse order
            order = list(paths) if round_ % 2 == 0 else list(reversed(paths))
            one = {}
            for key in order:
                label, start = paths[key]
                log(f"{n} stream(s): {label}" + (f" (round {round_ + 1}/{rounds})" if rounds > 1 else ""))
                one[key] = _run_streams(chosen, start)
            measured.append(one)
        rows.append(_summary(n, [label for label, *_ in streams[:n]], measured))
    machine = {
        "device": str(engine.base.device),
        "dtype": str(engine.base.dtype),
        "model": engine.base.name,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "rank": rank,
        "new_tokens": list(token_range),
    }
    if engine.base.device.type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(engine.base.device)
    return {"machine": machine, "rows": rows}


def _summary(n: int, fusions: list[str], measured: list[dict]) -> dict:
    """One row of the table from its rounds: each path's median tokens/s and p50 gap, and the
    two ratios as medians of the per-round ratios (each round's paths ran close together)."""

    def median_of(path: str, key: str):
        values = [m[path][key] for m in measured if m[path][key] is not None]
        return round(statistics.median(values), 4) if values else None

    speedups = [m["scheduler"]["tokens_per_s"] / m["thread_per_request"]["tokens_per_s"] for m in measured]
    mixed = [m["scheduler"]["tokens_per_s"] / m["scheduler_base_only"]["tokens_per_s"] for m in measured]
    row = {"streams": n, "fusions": fusions}
    for path in ("thread_per_request", "scheduler", "scheduler_base_only"):
        row[path] = {
            "tokens": measured[0][path]["tokens"],
            "tokens_per_s": round(statistics.median(m[path]["tokens_per_s"] for m in measured), 2),
            "p50_inter_token_s": median_of(path, "p50_inter_token_s"),
        }
    row["speedup"] = round(statistics.median(speedups), 2)
    row["mixed_vs_base_batched"] = round(statistics.median(mixed), 3)
    if len(measured) > 1:
        row["speedup_range"] = [round(min(speedups), 2), round(max(speedups), 2)]
        row["mixed_vs_base_range"] = [round(min(mixed), 3), round(max(mixed), 3)]
        row["rounds"] = measured
    return row


def format_table(result: dict) -> str:
    lines = [
        f"{'streams':>7} {'thread/req tok/s':>17} {'scheduler tok/s':>16} {'speed-up':>9} "
        f"{'base batched tok/s':>19} {'mixed/base':>11} {'p50 gap ms (thread/sched)':>26}"
    ]
    for row in result["rows"]:
        t, s, b = row["thread_per_request"], row["scheduler"], row["scheduler_base_only"]

        def gap(r):
            return "-" if r["p50_inter_token_s"] is None else f"{1000 * r['p50_inter_token_s']:.1f}"

        lines.append(
            f"{row['streams']:>7} {t['tokens_per_s']:>17.2f} {s['tokens_per_s']:>16.2f} "
            f"{row['speedup']:>8.2f}x {b['tokens_per_s']:>19.2f} {row['mixed_vs_base_batched']:>11.3f} "
            f"{gap(t) + ' / ' + gap(s):>26}"
        )
        if "rounds" in row:
            (a, b_), (c, d) = row["speedup_range"], row["mixed_vs_base_range"]
            lines.append(
                f"{'':>7} rounds: {len(row['rounds'])}, speed-up {a:.2f}-{b_:.2f}x, mixed/base {c:.3f}-{d:.3f}"
            )
    m = result["machine"]
    lines.append(
        f"[{m['model']} on {m['device']} {m['dtype']}, rank-{m['rank']} LoRAs, "
        f"{m['new_tokens'][0]}-{m['new_tokens'][1]} new tokens per stream, torch {m['torch']}, "
        f"{m['threads']} threads]"
    )
    return "\n".join(lines)


def main(args) -> int:
    import sys

    def log(*a, **k):
        print(*a, file=sys.stderr)

    concurrency = tuple(int(x) for x in str(args.concurrency).split(",") if x.strip())
    low, _, high = str(args.stream_tokens).partition(",")
    result = run_concurrency_bench(
        args.model or "default",
        args.device,
        args.dtype,
        concurrency,
        (int(low), int(high or low)),
        args.rank,
        log,
        rounds=max(1, args.rounds),
    )
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0
