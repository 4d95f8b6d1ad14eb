"""CLI: ``python -m lab {build,data,eval,eval-math,eval-code,eval-lang,base-compare,report}``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .train_lora import TrainConfig

REPO = Path(__file__).resolve().parents[1]
ADAPTERS = REPO / "assets" / "adapters"
FUSIONS = REPO / "assets" / "fusions"


def _math_examples(seed):
    from fusion.math_data import train_examples

    return [e.messages() for e in train_examples(2000, seed=seed)]


def _code_examples(seed):
    from .code_data import train_examples

    return train_examples(seed=seed)


def _lang_examples(lang):
    def f(seed):
        from .debian_text import build_examples

        return [r["messages"] for r in build_examples(lang, seed=seed)]

    return f


# name -> (config, example builder). Order = build order.
SPECS = {
    "task-math": (
        TrainConfig(
            name="task-math",
            role="task",
            skill="math",
            description="One- and two-step arithmetic word problems answered with a short worked "
            "solution ending in 'The answer is N.' (English).",
            data="fusion.math_data train templates (English, 24 templates, train-split numbers)",
            steps=200,
            max_length=160,
        ),
        _math_examples,
    ),
    "task-code": (
        TrainConfig(
            name="task-code",
            role="task",
            skill="code",
            description="Writes a Python function from a description (English docstring -> function).",
            data="lab.code_data: docstring -> function pairs from CPython 3.11 stdlib, Django 5.2.17 "
            "and Sphinx 9.0.4 sources",
            steps=150,
            max_length=320,
        ),
        _code_examples,
    ),
}
for _lang, _word in (("es", "Spanish"), ("ru", "Russian"), ("zh", "Chinese")):
    SPECS[f"lang-{_lang}"] = (
        TrainConfig(
            name=f"lang-{_lang}",
            role="language",
            skill=_lang,
            description=f"General (non-math) {_word}: answers and continues text in {_word}.",
            data=f"lab.debian_text ({_lang}): translation both ways, continuation and section-title "
            f"questions in {_word}, from Debian's installation guide, Debian Reference and fortunes",
            steps=120,
            max_length=256,
        ),
        _lang_examples(_lang),
    )


def cmd_build(args):
    from fusion.model import load_base_model

    from .fusions import fusion_steps

    step_names = [s.name for s in fusion_steps()]
    names = [n for n in args.only if n in SPECS] if args.only else list(SPECS)
    fusion_names = [n for n in args.only if n in step_names] if args.only else step_names
    unknown = [n for n in (args.only or []) if n not in SPECS and n not in step_names]
    if unknown:
        sys.exit(f"unknown step(s) {unknown}; choose from {list(SPECS) + step_names}")
    if args.skip_fusions:
        fusion_names = []
    from .train_lora import train_lora

    base = load_base_model()
    summary = {}
    for name in names:
        cfg, builder = SPECS[name]
        if args.steps:
            cfg.steps = args.steps
        cfg.seed = args.seed
        cfg.threads = args.threads
        out = Path(args.out) / name
        if (out / "studio.json").exists() and not args.force:
            rec = json.loads((out / "studio.json").read_text())["trained"]
            if rec.get("steps") == cfg.steps and rec.get("seed") == cfg.seed and rec.get("data") == cfg.data:
                print(f"[{name}] already built ({out}); --force to retrain")
                summary[name] = rec
                continue
        t0 = time.process_time()
        examples = builder(cfg.seed)
        print(f"[{name}] data: {len(examples)} examples in {time.process_time() - t0:.1f} s CPU")
        summary[name] = train_lora(cfg, examples, out, run_dir=args.runs, base=base)
    if fusion_names:
        import torch

        from fusion.engine import Engine

        from .fusions import build_fusions

        torch.set_num_threads(args.threads)
        engine = Engine(base=base, adapters_dir=args.out, fusions_dir=args.fusions_out)
        summary.update(
            build_fusions(
                engine,
                seed=args.seed,
                epochs=args.fusion_epochs,
                max_steps=args.fusion_max_steps,
                examples=args.fit_examples,
                force=args.force,
                only=fusion_names,
            )
        )
    print(
        json.dumps(
            {
                k: {"steps": v["steps"], "seconds": v["seconds"], "cpu_seconds": v.get("cpu_seconds")}
                if isinstance(v, dict)
                else v
                for k, v in summary.items()
            },
            indent=2,
        )
    )


def cmd_data(args):
    from fusion import math_data

    from . import code_data, lang_data

    samples = {
        "math-train-en": [e.messages() for e in math_data.train_examples(args.n, seed=args.seed)],
    }
    for lang in math_data.EVAL_LANGUAGES:
        samples[f"math-eval-{lang}"] = [e.messages() for e in math_data.eval_examples(lang, args.n, seed=args.seed)]
    samples["code-train"] = code_data.train_examples(seed=args.seed)[: args.n]
    for lang in lang_data.LANGUAGES:
        samples[f"lang-{lang}"] = _lang_examples(lang)(args.seed)[: args.n]
    if args.write:
        out = Path(args.write)
        out.mkdir(parents=True, exist_ok=True)
        for k, v in samples.items():
            with open(out / f"{k}.jsonl", "w", encoding="utf-8") as f:
                for m in v:
                    f.write(json.dumps({"messages": m}, ensure_ascii=False) + "\n")
        print(f"wrote {len(samples)} files to {out}")
    else:
        for k, v in samples.items():
            print(f"== {k}")
            for m in v:
                print(json.dumps(m, ensure_ascii=False))


def _engine_and_request(args, base=None):
    """An engine on the embedded model and the request for --adapter (a folder holding a peft
    adapter: that adapter alone, or MixLoRA's routing for a MixLoRA adapter) or for the base
    model without one (`base`: an already loaded model instead of the embedded one). Its replies
    decode in the engine's scheduler, as the app's do."""
    import tempfile

    import torch

    from fusion.api import FusionRequest
    from fusion.engine import Engine
    from fusion.errors import FusionError

    torch.set_num_threads(args.threads)
    if not args.adapter:
        return Engine(base=base), FusionRequest(method="base")
    folder = Path(args.adapter).expanduser().resolve()
    if not folder.is_dir():
        raise FusionError(f"--adapter {args.adapter}: no such folder")
    # the folder's siblings are the engine's library; no fusions are needed for one adapter
    engine = Engine(base=base, adapters_dir=folder.parent, fusions_dir=tempfile.mkdtemp(prefix="lab-eval-"))
    entry = next((a for a in engine.adapters() if a["name"] == folder.name), None)
    if entry is None:
        reason = engine.library_errors().get(folder.name, "not a peft adapter folder")
        raise FusionError(f"--adapter {args.adapter}: {reason}")
    method = "mixlora" if entry["kind"] == "mixlora" else "single"
    return engine, FusionRequest([folder.name], method)


def _append_jsonl(path: str, record: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")


def cmd_eval_math(args):
    from .evaluate_math import evaluate_math

    engine, request = _engine_and_request(args)
    for lang in args.lang:
        res = evaluate_math(engine, request, lang=lang, n=args.n, seed=args.seed, max_new_tokens=args.max_new_tokens)
        print(json.dumps({"adapter": args.adapter or "base", **{k: v for k, v in res.items() if k != "items"}}))
        if args.save:
            _append_jsonl(args.save, {"adapter": args.adapter or "base", **res})
        if args.show:
            for it in res["items"][: args.show]:
                print(json.dumps(it, ensure_ascii=False))


def cmd_examples(args):
    import torch

    from fusion.engine import Engine

    from .examples import pick_examples, write_examples

    torch.set_num_threads(args.threads)
    engine = Engine(adapters_dir=args.adapters_dir, fusions_dir=args.fusions_dir)
    examples = pick_examples(
        engine, args.lang, n=args.n, per_lang=args.per_lang, max_new_tokens=args.max_new_tokens, min_gap=args.min_gap
    )
    for example in examples:
        print(json.dumps(example, ensure_ascii=False))
    if args.out:
        write_examples(args.out, examples, engine.base_info().name)
        print(f"wrote {len(examples)} examples to {args.out}")


def cmd_eval_code(args):
    from .evaluate_code import evaluate_code

    engine, request = _engine_and_request(args)
    res = evaluate_code(engine, request, limit=args.n, offset=args.offset, max_new_tokens=args.max_new_tokens)
    print(json.dumps({"adapter": args.adapter or "base", **{k: v for k, v in res.items() if k != "items"}}))
    if args.save:
        _append_jsonl(args.save, {"adapter": args.adapter or "base", **res})


def cmd_eval_lang(args):
    from .evaluate_lang import evaluate_language

    engine, request = _engine_and_request(args)
    for lang in args.lang:
        res = evaluate_language(engine, request, lang, max_new_tokens=args.max_new_tokens)
        print(json.dumps({"adapter": args.adapter or "base", **{k: v for k, v in res.items() if k != "items"}}))
        if args.save:
            _append_jsonl(args.save, {"adapter": args.adapter or "base", **res})


def cmd_report(args):
    """Markdown table of the built adapters (from their studio.json)."""
    print("| adapter | role | steps | examples | wall s | CPU s | s/step (wall) | loss first→last 10 | size |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in SPECS:
        d = Path(args.out) / name
        if not (d / "studio.json").exists():
            print(f"| {name} | | not built | | | | | | |")
            continue
        st = json.loads((d / "studio.json").read_text())
        t = st["trained"]
        size = sum(f.stat().st_size for f in d.iterdir()) / 1e6
        print(
            f"| {name} | {st['role']} | {t['steps']} | {t['examples']} | {t['seconds']:.0f} | "
            f"{t.get('cpu_seconds', 0):.0f} | {t['seconds'] / t['steps']:.1f} | "
            f"{t.get('loss_first10')}→{t.get('loss_last10')} | {size:.1f} MB |"
        )


def cmd_base_compare(args):
    import torch

    from .base_compare import measure, table

    torch.set_num_threads(args.threads)
    results = [measure(spec, n_prose=args.prose, n_math=args.n, n_questions=args.questions) for spec in args.models]
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, ensure_ascii=False), encoding="utf-8")
    print(table(results))


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m lab")
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="train the adapters of the embedded library (resumable)")
    b.add_argument(
        "--only",
        nargs="+",
        metavar="NAME",
        help=f"some of {list(SPECS)} or of the fusion steps (es-math-flow, ..., mixlora-multi)",
    )
    b.add_argument("--steps", type=int, help="override the number of steps")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--out", default=str(ADAPTERS))
    b.add_argument("--runs", default=str(REPO / "runs"), help="checkpoint folder (git-ignored)")
    b.add_argument("--force", action="store_true", help="retrain even if the adapter exists")
    b.add_argument(
        "--threads", type=int, default=2, help="torch threads (1 is faster when other processes share the cores)"
    )
    b.add_argument("--fusions-out", default=str(FUSIONS), help="where fitted fusions go")
    b.add_argument("--skip-fusions", action="store_true", help="train the LoRAs only")
    b.add_argument(
        "--fusion-epochs",
        type=int,
        default=None,
        help="override the epochs of the gradient fits (LoRA-Flow and CAT: 5, MixLoRA: 1)",
    )
    b.add_argument(
        "--fusion-max-steps",
        type=int,
        default=None,
        help="cap every fusion fit at this many steps (LoraHub: its budget); for smoke runs",
    )
    b.add_argument(
        "--fit-examples", type=int, default=200, help="target-language examples per fusion fit (LoRA-Flow's paper: 200)"
    )
    b.set_defaults(func=cmd_build)
    v = sub.add_parser("eval", help="the results table: every method on the math suite (and code)")
    from .suite import add_eval_arguments

    add_eval_arguments(v)
    d = sub.add_parser("data", help="print (or --write) samples of every data set")
    d.add_argument("-n", type=int, default=3)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--write", metavar="DIR")
    d.set_defaults(func=cmd_data)
    e = sub.add_parser("eval-math", help="greedy exact-match accuracy on the math eval problems")
    e.add_argument("--adapter", help="peft folder, e.g. assets/adapters/task-math")
    e.add_argument("--lang", nargs="+", default=["en"])
    e.add_argument("-n", type=int, default=48)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--max-new-tokens", type=int, default=64)
    e.add_argument("--show", type=int, default=0)
    e.add_argument("--threads", type=int, default=2)
    e.add_argument("--save", metavar="JSONL", help="append the full result (every reply) to this file")
    e.set_defaults(func=cmd_eval_math)
    c = sub.add_parser("eval-code", help="HumanEval pass@1 (greedy; runs model-written code)")
    c.add_argument("--adapter", help="peft folder, e.g. assets/adapters/task-code")
    c.add_argument("-n", type=int, default=40, help="number of problems (0 = all 164)")
    c.add_argument("--offset", type=int, default=0)
    c.add_argument("--max-new-tokens", type=int, default=256)
    c.add_argument("--threads", type=int, default=2)
    c.add_argument("--save", metavar="JSONL")
    c.set_defaults(func=cmd_eval_code)
    g = sub.add_parser("eval-lang", help="share of replies in the question's language")
    g.add_argument("--adapter")
    g.add_argument("--lang", nargs="+", default=["es", "ru", "zh"])
    g.add_argument("--max-new-tokens", type=int, default=48)
    g.add_argument("--threads", type=int, default=2)
    g.add_argument("--save", metavar="JSONL")
    g.set_defaults(func=cmd_eval_lang)
    x = sub.add_parser(
        "examples", help="the chat's example questions: where each language's LoRA-Flow fusion answers right"
    )
    x.add_argument("--lang", nargs="+", default=["es", "ru", "zh"])
    x.add_argument("-n", type=int, default=200, help="evaluation problems tried per language")
    x.add_argument("--per-lang", type=int, default=2)
    x.add_argument("--max-new-tokens", type=int, default=128, help="the chat's default budget")
    x.add_argument("--min-gap", type=float, default=0.1, help="smallest lead of each greedy token's logit")
    x.add_argument("--threads", type=int, default=1)
    x.add_argument("--adapters-dir", default=str(ADAPTERS))
    x.add_argument("--fusions-dir", default=str(FUSIONS))
    x.add_argument("--out", help="write them here (the app reads assets/chat_examples.json)")
    x.set_defaults(func=cmd_examples)
    bc = sub.add_parser(
        "base-compare", help="which base model reads es/ru/zh (no LoRA): bits/char, reply language, math"
    )
    bc.add_argument(
        "--models", nargs="+", default=["default"], help="'default', a .gguf file (e.g. Gemma 3 270M) or a model folder"
    )
    bc.add_argument("-n", type=int, default=12, help="math problems per language")
    bc.add_argument("--prose", type=int, default=40, help="Debian paragraphs per language for bits/char")
    bc.add_argument("--questions", type=int, default=12, help="everyday questions per language (0: skip)")
    bc.add_argument("--threads", type=int, default=1)
    bc.add_argument("--json", help="write the raw measurements here")
    bc.set_defaults(func=cmd_base_compare)
    r = sub.add_parser("report", help="markdown table of the built adapters")
    r.add_argument("--out", default=str(ADAPTERS))
    r.set_defaults(func=cmd_report)
    args = p.parse_args(argv)
    from fusion.errors import FusionError

    try:
        args.func(args)
    except FusionError as exc:  # e.g. a Debian package the language data needs is not installed
        sys.exit(f"error: {exc}")


if __name__ == "__main__":
    main()
