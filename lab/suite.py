"""The results table: ``python -m lab eval --suite math``.

Rows: Base, the column's language LoRA alone, the task LoRA alone, linear average
(0.5/0.5) of language + task LoRA, TIES (peft defaults: density 0.5, weights 1/k), LoraHub,
CAT and LoRA-Flow with their fitted artifacts (``{lang}-math-lorahub`` / ``-cat`` / ``-flow``),
and the multi-task MixLoRA adapter. Columns: greedy exact-match accuracy on the final number
of the math evaluation problems in en, es, ru and zh, their mean over the target languages
es/ru/zh, and HumanEval pass@1 for the rows that apply to code.

* English has no language LoRA: the rows that need one show "—" in the en column, which is
  reported as the reference language; the mean is over es, ru and zh.
* Code (HumanEval's English prompts): Base and the task row with ``task-code``; the language
  fusions are not fitted for code (no target-language code data), so their cells show "—".
* Generation goes through the engine's scheduler, the path the app streams with: all of a
  cell's problems are submitted at once and decode together; a test checks that it gives the
  same replies as a solo decoding loop.
* Replies are cached (every ``--batch-size`` problems) in ``runs/eval-cache.json`` under a fingerprint of the
  adapter/fusion files, so an interrupted evaluation continues where it stopped and a larger
  ``-n`` only evaluates the new problems (the problem list for a seed is a prefix-stable list).
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from fusion.api import FusionRequest
from fusion.math_data import _generate, eval_examples

from .evaluate_code import problems as code_problems
from .evaluate_code import program, question, run_program
from .evaluate_math import greedy_replies
from .fusions import MIXLORA_NAME
from .math_fit_data import FIT_TEMPLATES
from .report import LANGS, ROWS, TARGET_LANGS, fits_table, mcnemar_table, results_block, table, write_results
from .scoring import score_reply

REPO = Path(__file__).resolve().parents[1]
CODE_ROWS = ("base", "task")
FITTED = {"lorahub": "lorahub", "cat": "cat", "lora_flow": "flow"}
SUITES = ("math",)


def request_for(engine, row: str, lang: str | None, task: str = "math"):
    """(FusionRequest, None) or (None, reason the cell is empty)."""
    adapters = {a["name"] for a in engine.adapters()}
    fusions = {f["name"] for f in engine.fusions()}
    task_lora = f"task-{task}"
    if row == "base":
        return FusionRequest(method="base"), None
    if row == "mixlora":
        if task != "math":
            return None, "not trained for code"
        if MIXLORA_NAME not in adapters:
            return None, "not trained"
        return FusionRequest([MIXLORA_NAME], "mixlora"), None
    if row == "task":
        return (FusionRequest([task_lora], "single"), None) if task_lora in adapters else (None, "not trained")
    if lang in (None, "en") or task != "math":
        return None, "no language LoRA"
    lang_lora = f"lang-{lang}"
    if lang_lora not in adapters:
        return None, f"{lang_lora} not trained"
    if row == "lang":
        return FusionRequest([lang_lora], "single"), None
    if task_lora not in adapters:
        return None, "not trained"
    if row in ("linear", "ties"):
        return FusionRequest([lang_lora, task_lora], row), None
    name = f"{lang}-{task}-{FITTED[row]}"
    if name not in fusions:
        return None, "not fitted"
    return FusionRequest(fusion=name), None


def _files_digest(paths) -> str:
    h = hashlib.sha256()
    for path in paths:
        path = Path(path)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            h.update(f.name.encode())
            h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()[:16]


def fingerprint(engine, request) -> str:
    """Changes when the request or any file it reads changes (a refit invalidates the cache)."""
    lib = engine.library
    paths = []
    if request.fusion:
        artifact = lib.get_fusion(request.fusion)
        paths.append(artifact.path)
        names = artifact.adapters
    else:
        names = request.adapters
    paths += [Path(engine.library_folders().adapters) / n for n in names]
    return hashlib.sha256((request.key() + engine.base_info().name + _files_digest(paths)).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------- cache
class Cache:
    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        self.data = {}
        if self.path and self.path.is_file():
            try:
                self.data = json.loads(self.path.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                self.data = {}

    def items(self, key: str, fp: str) -> list:
        entry = self.data.get(key)
        return list(entry["items"]) if entry and entry.get("fingerprint") == fp else []

    def put(self, key: str, fp: str, items: list) -> None:
        self.data[key] = {"fingerprint": fp, "items": items}
        if not self.path:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".eval-cache-", dir=self.path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(self.data, f, ensure_ascii=False)
        os.replace(tmp, self.path)


# ---------------------------------------------------------------------------- the suite
def _evaluate_cell(engine, cache, key, fp, request, problems, score, question, max_new_tokens, batch_size, log):
    items = cache.items(key, fp)[: len(problems)]
    if len(items) < len(problems):
        log(f"  {key}: {len(items)}/{len(problems)} cached, generating the rest")
    rest = problems[len(items) :]
    if not rest:
        return items
    for i, (problem, reply) in enumerate(
        zip(rest, greedy_replies(engine, request, [question(p) for p in rest], max_new_tokens)), 1
    ):
        items = items + [score(problem, reply)]
        if i % batch_size == 0 or i == len(rest):  # an interrupted cell resumes from here
            cache.put(key, fp, items)
    return items


def fit_distribution_problems(lang: str, n: int, seed: int = 0):
    """The fitting templates in `lang` with evaluation-split numbers (never fitted on)."""
    return _generate(FIT_TEMPLATES, lang, n, seed, "eval")


def run_suite(
    engine,
    n: int = 24,
    langs=LANGS,
    rows=tuple(ROWS),
    seed: int = 0,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    code_n: int = 20,
    code_max_new_tokens: int = 256,
    cache_path: str | Path | None = REPO / "runs" / "eval-cache.json",
    progress_bar: bool = True,
    log=print,
    split: str = "eval",
) -> dict:
    """Evaluate every (row, column) cell; returns {"math": {row: {lang: {k, n}|reason}}, "code": ...}.

    split "eval": the evaluation templates (the table of docs/results.md). split "fit": a
    diagnostic, the *fitting* templates of math_fit_data with evaluation-split numbers (held-out
    numbers, seen phrasing): did a fitted fusion learn what it was fitted on?"""
    from tqdm.auto import tqdm

    cache = Cache(cache_path)
    results = {"math": {}, "code": {}, "seconds": {}}
    cells = [(row, lang) for row in rows for lang in langs]
    bar = tqdm(cells, desc="eval", disable=not progress_bar)
    for row, lang in bar:
        bar.set_postfix(cell=f"{row}/{lang}")
        request, reason = request_for(engine, row, lang)
        if request is None:
            results["math"].setdefault(row, {})[lang] = reason
            continue
        if split == "fit":
            if lang not in TARGET_LANGS:
                results["math"].setdefault(row, {})[lang] = "no fitting templates"
                continue
            problems = fit_distribution_problems(lang, n, seed)
            key = f"math-fit|{row}|{lang}|seed={seed}|tokens={max_new_tokens}"
        else:
            problems = eval_examples(lang, n, seed=seed)
            key = f"math|{row}|{lang}|seed={seed}|tokens={max_new_tokens}"
        fp = fingerprint(engine, request)
        t0 = time.process_time()

        def score(p, r, lang=lang):
            return {"template": p.template, "expected": p.value, "reply": r, **score_reply(r, p.value, lang)}

        items = _evaluate_cell(
            engine, cache, key, fp, request, problems, score, lambda p: p.question, max_new_tokens, batch_size, log
        )
        # Cached replies from before the language score existed get it from their text.
        items = [i if "joint" in i else {**i, **score_reply(i["reply"], i["expected"], lang)} for i in items]
        results["math"].setdefault(row, {})[lang] = {
            "k": sum(i["correct"] for i in items),
            "n": len(items),
            "k_joint": sum(i["joint"] for i in items),
        }
        results.setdefault("paired", {}).setdefault(row, {})[lang] = {
            "correct": [bool(i["correct"]) for i in items],
            "joint": [bool(i["joint"]) for i in items],
        }
        results["seconds"][f"{row}|{lang}"] = round(time.process_time() - t0, 1)
    bar.close()
    if code_n and split == "eval":
        probs = code_problems(code_n)
        for row in rows:
            if row not in CODE_ROWS:
                results["code"][row] = "—"
                continue
            request, reason = request_for(engine, row, None, task="code")
            if request is None:
                results["code"][row] = reason
                continue
            key = f"code|{row}|tokens={code_max_new_tokens}"
            fp = fingerprint(engine, request)

            def score(p, r):
                return {"task_id": p["task_id"], "reply": r, "passed": run_program(program(p, r))}

            items = _evaluate_cell(
                engine, cache, key, fp, request, probs, score, question, code_max_new_tokens, batch_size, log
            )
            results["code"][row] = {"k": sum(i["passed"] for i in items), "n": len(items)}
    return results


# ---------------------------------------------------------------------------- command line
def add_eval_arguments(p) -> None:
    p.add_argument(
        "--suite",
        default="math",
        choices=SUITES,
        help="math: the templated one/two-step word problems in en/es/ru/zh (docs/data.md "
        "explains why not GSM-level problems)",
    )
    p.add_argument("-n", type=int, default=200, help="math problems per language")
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--langs", nargs="+", default=list(LANGS), choices=list(LANGS))
    p.add_argument("--code-n", type=int, default=20, help="HumanEval problems (0: no code column)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="save the cache every N replies (a cell's problems all decode together)",
    )
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument(
        "--cache",
        default=str(REPO / "runs" / "eval-cache.json"),
        help="per-cell results, so an interrupted run continues ('' disables)",
    )
    p.add_argument(
        "--split",
        default="eval",
        choices=("eval", "fit"),
        help="eval: the evaluation templates (the results table); fit: a diagnostic on the fitting "
        "templates with held-out numbers (not written by --out)",
    )
    p.add_argument("--out", default=None, help="markdown file to write the table into (e.g. docs/results.md)")
    p.add_argument("--json", default=None, help="also write the raw results here")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", default="default")
    p.add_argument("--adapters-dir", default=str(REPO / "assets" / "adapters"))
    p.add_argument("--fusions-dir", default=str(REPO / "assets" / "fusions"))
    p.set_defaults(func=cmd_eval)


def cmd_eval(args, engine=None, argv=None) -> int:
    torch.set_num_threads(args.threads)
    if engine is None:
        from fusion.engine import Engine

        engine = Engine(
            model=args.model,
            adapters_dir=args.adapters_dir,
            fusions_dir=args.fusions_dir,
            progress=lambda *a, **k: print(*a, file=sys.stderr),
        )
    results = run_suite(
        engine,
        n=args.n,
        langs=args.langs,
        rows=args.rows,
        seed=args.seed,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        code_n=args.code_n,
        cache_path=args.cache or None,
        split=args.split,
    )
    print(table(results, args.langs, args.rows))
    print(mcnemar_table(results, args.langs))
    if args.split != "eval":
        return 0
    argv = sys.argv[1:] if argv is None else argv
    command = "python -m lab " + " ".join(shlex.quote(a) for a in argv)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2), encoding="utf-8")
    if args.out:
        write_results(
            args.out,
            results_block(
                results,
                command,
                args.n,
                args.seed,
                args.langs,
                args.code_n,
                args.max_new_tokens,
                engine.base_info().name,
                fits_table(engine),
            ),
        )
        print(f"wrote {args.out}")
    return 0
