"""Greedy exact-match accuracy on the templated math problems.

Replies come from the engine's scheduler (the path the app streams with): every question of a
call is submitted at once and they decode together, each under the request's fusion (base, one
adapter, or any fusion the engine can plan), and are scored on the final number of the reply.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from fusion.api import Sampling
from fusion.math_scoring import final_number, is_correct  # noqa: F401  (the lab's scorer)


def greedy_replies(engine, request, questions: list[str], max_new_tokens: int = 64) -> Iterator[str]:
    """Greedy replies to single-turn questions under a request's fusion, in the questions' order
    (each as soon as it and those before it are done); all of them decode together."""
    prompts = [engine.encode_messages(q) for q in questions]
    sampling = Sampling(max_new_tokens=max_new_tokens)
    for event in engine.generate_ids_many(request, prompts, sampling, trace=False):
        yield event.text


def generate_replies(engine, request, questions: list[str], max_new_tokens: int = 64) -> list[str]:
    return list(greedy_replies(engine, request, questions, max_new_tokens))


def evaluate_math(
    engine, request, lang: str = "en", n: int = 48, seed: int = 0, max_new_tokens: int = 64, examples=None
) -> dict:
    """Accuracy on ``n`` evaluation problems in ``lang`` (or on the given examples)."""
    from fusion.math_data import eval_examples

    exs = examples if examples is not None else eval_examples(lang, n, seed=seed)
    t0 = time.perf_counter()
    replies = generate_replies(engine, request, [e.question for e in exs], max_new_tokens)
    items = [
        {
            "template": e.template,
            "question": e.question,
            "expected": e.value,
            "reply": r,
            "got": final_number(r),
            "correct": is_correct(r, e.value),
        }
        for e, r in zip(exs, replies)
    ]
    correct = sum(it["correct"] for it in items)
    return {
        "lang": lang,
        "n": len(items),
        "correct": correct,
        "accuracy": correct / max(1, len(items)),
        "seconds": round(time.perf_counter() - t0, 1),
        "items": items,
    }
