"""The chat's example questions: ``python -m lab examples``.

For each target language, the evaluation problems on which that language's fitted LoRA-Flow
fusion (``{lang}-math-flow``) answers the chat's way (greedy, the chat's default budget of new
tokens, the model's default system prompt) with the right final number *and* in the question's
language, and whose every worked step ("47 - 45 = 2") is true arithmetic with the last one
arriving at the answer, so that a right number reached by a wrong step is not shown. They are chosen for the app to show what the fusion does, so they are the fusion's
successes by construction: the results table, not these examples, says how often it succeeds.

A greedy reply is only worth showing if another CPU gives the same one: a candidate is kept
only when, at every token of its reply, the chosen token's logit leads the runner-up by at
least ``--min-gap`` (far above the ~1e-4 by which logits differ between CPU code paths), and
when the reply ended by itself rather than at the token budget. Among those, the ones with the
widest smallest lead are kept, one per template.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from fusion.api import FusionRequest, Sampling
from fusion.math_data import eval_examples

from .scoring import score_reply

LANGS = ("es", "ru", "zh")
_STEP = re.compile(r"(\d+)\s*([-+−×x*÷/])\s*(\d+)\s*=\s*(\d+)")
_OPS = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "−": lambda a, b: a - b,
    "×": lambda a, b: a * b,
    "x": lambda a, b: a * b,
    "*": lambda a, b: a * b,
    "÷": lambda a, b: a / b if b else None,
    "/": lambda a, b: a / b if b else None,
}


def steps_are_true(reply: str, answer: int) -> bool:
    """The reply shows at least one worked step, every "a op b = c" in it holds, and the last
    one arrives at the answer."""
    steps = _STEP.findall(reply)
    return (
        bool(steps) and all(_OPS[op](int(a), int(b)) == int(c) for a, op, b, c in steps) and int(steps[-1][3]) == answer
    )


def smallest_lead(engine, request: FusionRequest, prompt: list[int], reply: list[int]) -> float:
    """The smallest margin, over the reply's tokens, of the greedy token's logit over the next best."""
    ids = torch.tensor([prompt + reply])
    logits, _ = engine.logits(request, ids)
    steps = logits[0, len(prompt) - 1 : len(prompt) - 1 + len(reply)].float()  # (R, V)
    top = steps.topk(2, dim=-1)
    if not torch.equal(top.indices[:, 0], torch.tensor(reply)):
        return float("-inf")  # not the greedy reply: never shown
    return float((top.values[:, 0] - top.values[:, 1]).min())


def pick_examples(
    engine, langs=LANGS, n: int = 200, per_lang: int = 2, max_new_tokens: int = 128, min_gap: float = 0.1, log=print
) -> list[dict]:
    fusions = {f["name"] for f in engine.fusions()}
    picked = []
    for lang in langs:
        name = f"{lang}-math-flow"
        if name not in fusions:
            log(f"{lang}: no fusion named {name}; skipped")
            continue
        request = FusionRequest(fusion=name)
        problems = eval_examples(lang, n)
        prompts = [engine.encode_messages(p.question) for p in problems]
        events = engine.generate_ids_many(request, prompts, Sampling(max_new_tokens=max_new_tokens), trace=False)
        candidates = []
        for problem, prompt, event in zip(problems, prompts, events):
            score = score_reply(event.text, problem.value, lang)
            if not score["joint"] or event.finish_reason == "length" or not steps_are_true(event.text, problem.value):
                continue
            lead = smallest_lead(engine, request, prompt, event.token_ids)
            candidates.append((lead, problem, event.text))
        good = sorted((c for c in candidates if c[0] >= min_gap), key=lambda c: -c[0])
        log(
            f"{lang}: {len(candidates)} of {n} right, in the language and with true steps; {len(good)} with a lead >= {min_gap}"
        )
        templates = set()
        for lead, problem, text in good:
            if problem.template in templates:
                continue
            templates.add(problem.template)
            picked.append(
                {
                    "lang": lang,
                    "fusion": name,
                    "question": problem.question,
                    "answer": problem.value,
                    "reply": text,
                    "smallest_lead": round(lead, 3),
                }
            )
            if len(templates) == per_lang:
                break
    return picked


def write_examples(path: str | Path, examples: list[dict], base_name: str) -> None:
    payload = {"base_model": base_name, "examples": examples}
    Path(path).write_text(json.dumps(payload, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
