"""Several fusions answering one prompt at once: each column's stream is pulled by a thread of
its own so that the columns join the engine's running batch together and decode in the same
steps; the caller gets every column's state after each event."""

from __future__ import annotations

import queue
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass

from fusion import plots
from fusion.api import Backend, Sampling
from fusion.math_scoring import is_correct

from .choices import request_label
from .common import error_line, queued_note


@dataclass
class ColumnResult:
    label: str
    text: str = ""
    stats: str = "waiting…"
    trace: object = None
    error: str | None = None
    done: bool = False
    seconds_to_first_token: float | None = None
    tokens_per_second: float | None = None
    finish_reason: str | None = None
    queued: int = 0  # > 0: waiting for room in the engine's batch, at this place

    def summary(self) -> dict:
        return {
            "label": self.label,
            "text": self.text,
            "error": self.error,
            "seconds_to_first_token": self.seconds_to_first_token,
            "tokens_per_second": self.tokens_per_second,
            "finish_reason": self.finish_reason,
            "trace": plots.trace_summary(self.trace),
        }


def run_side_by_side(
    engine: Backend, requests: list, prompt: str, sampling: Sampling, system: str | None, cancel: threading.Event
):
    """Every column's stream at once, each pulled by a thread of its own, so the columns join the
    engine's running batch together and decode in the same steps (and a remote column that stalls
    holds up no other); yields the results after each event. A column whose request fails shows
    its error and the others go on."""
    results = [ColumnResult(request_label(engine, r)) for r in requests]
    events: queue.Queue = queue.Queue()  # (column, event | exception | None = that column ended)
    leaving = threading.Event()  # the caller stopped listening: the columns end at their next event

    def pull(i: int, request) -> None:
        stream = None
        try:
            stream = engine.stream(request, prompt, sampling, system=system, cancel=cancel)
            for event in stream:
                events.put((i, event))
                if leaving.is_set():
                    break
        except Exception as exc:
            events.put((i, exc))
        finally:
            if stream is not None:
                stream.close()
            events.put((i, None))

    live = 0
    for i, request in enumerate(requests):
        if isinstance(request, Exception):
            results[i].error, results[i].done = error_line(request), True
        else:
            threading.Thread(target=pull, args=(i, request), name=f"compare-column-{i}", daemon=True).start()
            live += 1
    try:
        yield results
        while live:
            i, item = events.get()
            result = results[i]
            if item is None:
                live -= 1
                continue
            if isinstance(item, Exception):
                result.error, result.done = error_line(item), True
                yield results
                continue
            result.text, result.queued = item.text, item.queued
            result.seconds_to_first_token = item.seconds_to_first_token
            if item.done:
                result.done, result.trace = True, item.trace
                result.tokens_per_second, result.finish_reason = item.tokens_per_second, item.finish_reason
            yield results
    finally:
        leaving.set()
        if live:  # stopped early: rows still waiting in the engine's queue leave it too
            cancel.set()


def stats_text(result: ColumnResult) -> str:
    if result.error:
        return f"⚠ {result.error}"
    parts = [f"**{result.label}**"]
    if result.seconds_to_first_token is not None:
        parts.append(f"first token {result.seconds_to_first_token:.2f} s")
    if result.tokens_per_second:
        parts.append(f"{result.tokens_per_second:.1f} tok/s")
    if result.done:
        parts.append(
            {"cancelled": "stopped", "length": "token limit", "eos": "finished"}.get(
                result.finish_reason, result.finish_reason or "done"
            )
        )
    elif result.queued:
        parts.append(queued_note(result.queued))
    elif result.seconds_to_first_token is None:
        parts.append("waiting…")
    return " · ".join(parts)


SCORE_PARALLEL = 16  # problems in flight at once: the engine batches them (more would only queue)


def score_columns(
    engine: Backend, requests: list, problems: list, sampling: Sampling, cancel: threading.Event, on_progress=None
) -> list[list]:
    """Every column's answers to every problem, submitted together so that the engine decodes
    them in shared batches. Returns one row per column: [label, correct, problems, accuracy or
    error]. A column whose request is an error, or one of whose answers fails, shows the error;
    after `cancel` the answers still missing count as wrong. on_progress(done, total) after each
    answer."""
    jobs = [(c, p) for c, r in enumerate(requests) if not isinstance(r, Exception) for p in range(len(problems))]
    correct = [0] * len(requests)
    errors: list[str | None] = [error_line(r) if isinstance(r, Exception) else None for r in requests]

    def answer(c: int, p: int):
        return engine.generate(requests[c], problems[p].question, sampling, cancel=cancel, trace=False)

    if jobs:
        with ThreadPoolExecutor(max_workers=min(SCORE_PARALLEL, len(jobs)), thread_name_prefix="score") as pool:
            futures = {pool.submit(answer, c, p): (c, p) for c, p in jobs}
            for done, future in enumerate(as_completed(futures), 1):
                c, p = futures[future]
                try:
                    correct[c] += is_correct(future.result().text, problems[p].value)
                except Exception as exc:
                    errors[c] = errors[c] or error_line(exc)
                if on_progress is not None:
                    on_progress(done, len(jobs))
    rows = []
    for c, request in enumerate(requests):
        label = request_label(engine, request)
        if errors[c] is not None:
            rows.append([label, None, len(problems), errors[c]])
        else:
            rows.append([label, correct[c], len(problems), f"{correct[c] / max(1, len(problems)):.0%}"])
    return rows
