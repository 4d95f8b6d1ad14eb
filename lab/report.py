"""The results table of ``python -m lab eval``: Wilson intervals, the markdown table, the
fitted-artifact costs, and rewriting the block between the markers of docs/results.md."""

from __future__ import annotations

import json
import math
from pathlib import Path

from fusion.safe_io import atomic_write_text

LANGS = ("en", "es", "ru", "zh")
TARGET_LANGS = ("es", "ru", "zh")
ROWS = {  # key -> label
    "base": "Base",
    "lang": "Language LoRA alone (lang-xx)",
    "task": "Task LoRA alone (task-math / task-code)",
    "linear": "Linear average (0.5 · lang + 0.5 · task)",
    "ties": "TIES (density 0.5)",
    "lorahub": "LoraHub (fitted)",
    "cat": "CAT (fitted)",
    "lora_flow": "LoRA-Flow (fitted gates)",
    "mixlora": "MixLoRA (multi-task, 8 experts top-2)",
}


# ---------------------------------------------------------------------------- statistics
def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95 % Wilson score interval of a binomial proportion k/n."""
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def cell_text(k: int, n: int) -> str:
    lo, hi = wilson(k, n)
    return f"{k}/{n} = {100 * k / n:.0f}% [{100 * lo:.0f}–{100 * hi:.0f}]"


# ---------------------------------------------------------------------------- requests
# ---------------------------------------------------------------------------- the table
def _fmt(cell, key: str = "k") -> str:
    if isinstance(cell, dict):
        return cell_text(cell[key], cell["n"]) if key in cell else "—"
    return "—" if cell in (None, "no language LoRA", "—") else f"— ({cell})"


def table(results: dict, langs=LANGS, rows=None, key: str = "k") -> str:
    """key "k": final number right; "k_joint": right and in the question's language."""
    rows = rows or list(results["math"])
    targets = [l for l in langs if l in TARGET_LANGS]
    code = key == "k" and any(isinstance(v, dict) for v in results.get("code", {}).values())
    head = (
        ["method"]
        + list(langs)
        + ([f"mean ({', '.join(targets)})"] if targets else [])
        + (["code pass@1 (HumanEval)"] if code else [])
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = results["math"].get(row, {})
        out = [ROWS.get(row, row)] + [_fmt(cells.get(l), key) for l in langs]
        if targets:
            got = [cells.get(l) for l in targets]
            if all(isinstance(c, dict) and key in c for c in got):
                out.append(cell_text(sum(c[key] for c in got), sum(c["n"] for c in got)))
            else:
                out.append("—")
        if code:
            out.append(_fmt(results["code"].get(row)))
        lines.append("| " + " | ".join(out) + " |")
    return "\n".join(lines)


# LoRA-Flow is compared with each of these on the same problems.
COMPARED = ("task", "lang", "linear", "lorahub", "cat")


def _paired_cell(first: list[bool], second: list[bool]) -> str:
    from .scoring import discordant, mcnemar_exact

    b, c = discordant(first, second)
    return f"{b}–{c}, p = {mcnemar_exact(b, c):.3g}"


def mcnemar_table(results: dict, langs=LANGS, reference: str = "lora_flow", compared=COMPARED) -> str:
    """LoRA-Flow against each row on the same problems: discordant counts (only LoRA-Flow right –
    only the other right) and the two-sided exact McNemar p-value, per language and pooled."""
    paired = results.get("paired", {})
    targets = [l for l in langs if l in TARGET_LANGS]
    head = [f"{ROWS[reference]} vs", "score"] + targets + ([f"pooled ({', '.join(targets)})"] if targets else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for other in compared:
        for score, label in (("correct", "final number"), ("joint", "number and language")):
            out = [ROWS.get(other, other), label]
            pooled_a, pooled_b, complete = [], [], True
            for lang in targets:
                a = paired.get(reference, {}).get(lang, {}).get(score)
                b = paired.get(other, {}).get(lang, {}).get(score)
                if a is None or b is None or len(a) != len(b):
                    out.append("—")
                    complete = False
                    continue
                out.append(_paired_cell(a, b))
                pooled_a += a
                pooled_b += b
            if targets:
                out.append(_paired_cell(pooled_a, pooled_b) if complete else "—")
            lines.append("| " + " | ".join(out) + " |")
    return "\n".join(lines)


BEGIN, END = "<!-- results-table:begin -->", "<!-- results-table:end -->"


def fits_table(engine) -> str:
    """What the library's fitted steps cost: one row per fusion artifact and trained MixLoRA."""
    rows = []
    for f in sorted(engine.fusions(), key=lambda f: f["name"]):
        b = f["meta"].get("build")
        if b:
            rows.append((f["name"], f["method"], b))
    for a in sorted(engine.adapters(), key=lambda a: a["name"]):
        studio = Path(engine.library_folders().adapters) / a["name"] / "studio.json"
        if a.get("kind") == "mixlora" and studio.is_file():
            b = json.loads(studio.read_text(encoding="utf-8")).get("trained")
            if b:
                rows.append((a["name"], "mixlora", b))
    if not rows:
        return "(no fitted fusions in the library yet)"
    metas = {f["name"]: f["meta"] for f in engine.fusions()}
    lines = [
        "| artifact | method | examples | steps | wall s | CPU s | loss first→last 10 | seed | chosen |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, method, b in rows:
        lines.append(
            f"| {name} | {method} | {b.get('examples')} | {b.get('steps')} | {b.get('seconds'):.0f} | "
            f"{b.get('cpu_seconds'):.0f} | {b.get('loss_first')}→{b.get('loss_last')} | {b.get('seed')} | "
            f"{_chosen(method, b, metas.get(name, {}))} |"
        )
    return "\n".join(lines)


def _chosen(method: str, build: dict, meta: dict) -> str:
    """What a fit settled on: LoRA-Flow's lr, epoch and temperature; CAT's distance from uniform."""
    if method == "lora_flow" and build.get("dev"):
        best = min(build["dev"], key=lambda t: min(t["dev_losses"]))
        return (
            f"lr {best['lr']:g}, epoch {best['best_epoch']} (dev loss {min(best['dev_losses']):.3f}), "
            f"T {meta.get('temperature', 1.0):g}"
        )
    if method == "cat" and "max_weight_shift" in meta:
        return f"largest \\|w − 1/k\\| {meta['max_weight_shift']:.2f}"
    return ""


def results_block(
    results: dict,
    command: str,
    n: int,
    seed: int,
    langs,
    code_n: int,
    max_new_tokens: int,
    engine_name: str,
    fits: str = "",
) -> str:
    from fusion.math_data import EVAL_TEMPLATES

    sizes = f"n = {n} problems per language cell"
    if any(l in TARGET_LANGS for l in langs):
        sizes += f" (mean column: {n * len([l for l in langs if l in TARGET_LANGS])} problems pooled)"
    if code_n:
        sizes += f"; code: the first {code_n} HumanEval problems"
    return "\n".join(
        [
            BEGIN,
            "",
            f"Produced by `{command}` (base model: {engine_name}).",
            "",
            "**Final number right:**",
            "",
            table(results, langs),
            "",
            "**Final number right and the reply in the question's language:**",
            "",
            table(results, langs, key="k_joint"),
            "",
            f"Each cell: correct/total = accuracy [95 % Wilson interval]. {sizes}. Greedy decoding, "
            f"{max_new_tokens} new tokens for math, exact match of the final number. Language: Cyrillic "
            f"(ru) or Han (zh) letters at least half of the reply's letters; py3langid for es and en.",
            "",
            "**Paired comparisons** (the same problems): LoRA-Flow's wins–losses among the problems on "
            "which exactly one of the two is right, and the two-sided exact McNemar p-value:",
            "",
            mcnemar_table(results, langs),
            "",
            f"Split: the math evaluation set of `fusion/math_data.py`: the {len(EVAL_TEMPLATES)} evaluation "
            f"templates (authored separately in en/es/ru/zh, never used for training, fitting or dev) with operand "
            f"tuples from the evaluation side of the hash split, seed {seed}, the first n problems "
            f"(the same problems and numbers in every language). Fusions were fitted on "
            f"`lab/math_fit_data.py` (training templates, training numbers) and chose their settings "
            f"on the dev templates only.",
            "",
            *(
                [
                    "Fitted artifacts in the library (from their metadata; LoraHub's steps are its "
                    "candidate evaluations):",
                    "",
                    fits,
                    "",
                ]
                if fits
                else []
            ),
            END,
        ]
    )


def write_results(path: str | Path, block: str) -> None:
    path = Path(path)
    if path.is_file():
        text = path.read_text(encoding="utf-8")
        if BEGIN in text and END in text:
            before, rest = text.split(BEGIN, 1)
            after = rest.split(END, 1)[1]
            atomic_write_text(path, before + block + after)
            return
        atomic_write_text(path, text.rstrip() + "\n\n" + block + "\n")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "# Results\n\n" + block + "\n")
