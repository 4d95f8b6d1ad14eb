"""The fusion steps of `python -m lab build` and the results-table command, on a tiny random Llama.

Fast: a couple of fitting steps and a couple of problems. What is checked: the target-language
fitting data never touches the evaluation problems; each fusion step fits, saves its artifact
with its CPU time, and is skipped when re-run; the table's greedy generation (every question of
a cell in the scheduler at once) gives the same replies as a solo decoding loop; the Wilson
intervals; and an interrupted evaluation resumes from its cache without redoing finished cells.
"""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from fixtures_formats import tiny_tokenizer
from helpers import lora_state, write_lora

from fusion import math_data as md
from lab import math_fit_data as mfd
from lab import report, suite
from lab.evaluate_math import final_number


# ---------------------------------------------------------------------------- data
def test_fit_templates_are_training_templates_not_evaluation_ones():
    eval_ids = {t.id for t in md.EVAL_TEMPLATES}
    train_ids = {t.id for t in md.TRAIN_TEMPLATES}
    programs = set()
    for t in mfd.FIT_TEMPLATES:
        assert t.id not in eval_ids
        assert t.id.removesuffix("-xx") in train_ids  # a translation of a training template
        assert set(t.text) == set(mfd.FIT_LANGUAGES)
        programs.add(t.program)
        for lang, text in t.text.items():
            assert all(text != e.text[lang] for e in md.EVAL_TEMPLATES)
    assert programs == set(md.PROGRAMS)


@pytest.mark.parametrize("lang", mfd.FIT_LANGUAGES)
def test_fit_examples_disjoint_from_evaluation(lang):
    fit = mfd.fit_examples(lang, 200, seed=0)
    assert len(fit) == 200 and all(e.language == lang for e in fit)
    evaluation = md.eval_examples(lang, 96, seed=0)  # (all eval problems have eval-split numbers)
    eval_keys = {(e.program, e.numbers) for e in evaluation}
    eval_questions = {e.question for e in evaluation}
    for e in fit:
        assert md.number_split(e.program, dict(e.numbers)) == "train"
        assert (e.program, e.numbers) not in eval_keys
        assert e.question not in eval_questions
        assert "{" not in e.question and "}" not in e.question  # every slot and agreement filled
        assert final_number(e.answer) == e.value  # the localized answer sentence is read back
        assert e.answer.startswith(md.solve(e.program, dict(e.numbers))[1][0])
    records = mfd.fit_records(lang, 3, seed=0)
    assert [r["messages"][1]["content"] for r in records] == [e.answer for e in fit[:3]]


# ---------------------------------------------------------------------------- statistics
def test_wilson_interval_values():
    assert report.wilson(5, 10) == pytest.approx((0.236593, 0.763407), abs=1e-6)
    assert report.wilson(0, 10) == pytest.approx((0.0, 0.277533), abs=1e-6)
    assert report.wilson(10, 10) == pytest.approx((0.722467, 1.0), abs=1e-6)
    assert report.wilson(19, 48) == pytest.approx((0.270208, 0.536896), abs=1e-6)
    assert report.cell_text(5, 10) == "5/10 = 50% [24–76]"


def solo_replies(engine, request, questions: list[str], max_new_tokens: int) -> list[str]:
    """Greedy replies one question at a time through the solo decoding loop (the reference)."""
    from fusion.api import Sampling
    from fusion.generate import stream_tokens
    from fusion.runtime import Run

    with engine.using(engine.plan(request)) as plan:
        return [
            list(
                stream_tokens(
                    engine.model,
                    engine.tokenizer,
                    Run(plan),
                    engine.encode_messages(q),
                    Sampling(max_new_tokens=max_new_tokens),
                    record_trace=False,
                )
            )[-1].text
            for q in questions
        ]


# ---------------------------------------------------------------------------- a tiny library
@pytest.fixture()
def tiny_engine(tmp_path):
    from helpers import tiny_config
    from transformers import LlamaForCausalLM

    from fusion.engine import Engine
    from fusion.model import BaseModel

    tokenizer = tiny_tokenizer()
    config = tiny_config(layers=2, hidden=32, vocab=len(tokenizer))
    config.max_position_embeddings = 4096
    torch.manual_seed(5)
    model = LlamaForCausalLM(config).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    model.config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    for seed, name in enumerate(("lang-es", "task-math")):
        write_lora(
            tmp_path / "adapters" / name,
            model,
            rank=4,
            alpha=8.0,
            state=lora_state(model, rank=4, seed=20 + seed, std=0.05),
        )
    return Engine(
        base=BaseModel(model, tokenizer, "tiny", torch.device("cpu"), torch.float32),
        adapters_dir=tmp_path / "adapters",
        fusions_dir=tmp_path / "fusions",
    )


def _build(engine, **kw):
    from lab.fusions import build_fusions

    logs = []
    summary = build_fusions(
        engine, langs=("es", "ru"), max_steps=2, examples=8, progress_bar=False, log=logs.append, **kw
    )
    return summary, logs


def test_fusion_steps_fit_save_and_skip(tiny_engine):
    summary, logs = _build(tiny_engine)
    for name, method in (("es-math-flow", "lora_flow"), ("es-math-cat", "cat"), ("es-math-lorahub", "lorahub")):
        doc = json.loads((tiny_engine.library.fusions_dir / name / "fusion.json").read_text())
        assert doc["method"] == method and doc["adapters"] == ["lang-es", "task-math"]
        build = doc["meta"]["build"]
        assert build["steps"] == 2 and build["seed"] == 0 and build["examples"] == 8
        assert build["cpu_seconds"] >= 0 and build["seconds"] >= 0
        assert "es math problems" in build["data"]
    # LoRA-Flow: one fit per grid point, each judged on the dev templates; the kept one is the
    # lowest dev loss, and it carries the language's inference temperature (es: 1.0).
    flow = json.loads((tiny_engine.library.fusions_dir / "es-math-flow" / "fusion.json").read_text())["meta"]
    tried = flow["build"]["dev"]
    assert [t["lr"] for t in tried] == [1e-3, 1e-4] and all(len(t["dev_losses"]) == 1 for t in tried)
    assert flow["dev_losses"] == min((t["dev_losses"] for t in tried), key=min)
    assert flow["dev_examples"] == 60 and flow["temperature"] == 1.0
    best = min(tried, key=lambda t: min(t["dev_losses"]))
    fits = report.fits_table(tiny_engine)
    assert "| es-math-flow | lora_flow | 8 | 2 |" in fits
    assert f"lr {best['lr']:g}, epoch 1 (dev loss {min(best['dev_losses']):.3f}), T 1 |" in fits
    cat = json.loads((tiny_engine.library.fusions_dir / "es-math-cat" / "fusion.json").read_text())["meta"]
    assert f"largest \\|w − 1/k\\| {cat['max_weight_shift']:.2f} |" in fits
    # lang-ru is not in the library: its steps wait instead of failing
    assert summary["ru-math-flow"].startswith("skipped")
    studio = json.loads((tiny_engine.library.adapters_dir / "mixlora-multi" / "studio.json").read_text())
    assert studio["trained"]["steps"] == 2 and studio["trained"]["cpu_seconds"] >= 0
    assert (tiny_engine.library.adapters_dir / "mixlora-multi" / "adapter_model.safetensors").is_file()
    assert "mixlora-multi" in {a["name"] for a in tiny_engine.adapters()}
    # the saved fusions are usable by name, as the app and the table use them
    from fusion.engine import FusionRequest

    ids = torch.tensor([[5, 6, 7, 8]])
    for name in ("es-math-flow", "es-math-cat", "es-math-lorahub"):
        logits, _ = tiny_engine.logits(FusionRequest(fusion=name), ids)
        assert torch.isfinite(logits).all()
    # a second run skips every finished step
    before = {p: p.stat().st_mtime_ns for p in tiny_engine.library.fusions_dir.rglob("*.json")}
    _, logs2 = _build(tiny_engine)
    assert sum("already built" in line for line in logs2) == 4
    assert before == {p: p.stat().st_mtime_ns for p in tiny_engine.library.fusions_dir.rglob("*.json")}
    # other settings refit
    _, logs3 = _build(tiny_engine, only=["es-math-lorahub"], seed=1)
    assert any("refitting" in line for line in logs3)


# ---------------------------------------------------------------------------- generation
def test_batched_greedy_equals_engine_generate(tiny_engine):
    from fusion.engine import FusionRequest
    from lab.fusions import build_fusions

    build_fusions(
        tiny_engine,
        langs=("es",),
        methods=("lora_flow",),
        mixlora=False,
        max_steps=2,
        examples=8,
        progress_bar=False,
        log=lambda *a: None,
    )
    questions = ["¿Cuánto es 2 + 3?", "Juan tiene 12 lápices y compra 7 más. ¿Cuántos tiene?", "hola"]
    for request in (
        FusionRequest(method="base"),
        FusionRequest(["lang-es", "task-math"], "linear"),
        FusionRequest(fusion="es-math-flow"),
    ):
        batched = list(suite.greedy_replies(tiny_engine, request, questions, max_new_tokens=6))
        assert batched == solo_replies(tiny_engine, request, questions, 6), request


def test_request_rows(tiny_engine):
    assert suite.request_for(tiny_engine, "lang", "en") == (None, "no language LoRA")
    assert suite.request_for(tiny_engine, "lora_flow", "es") == (None, "not fitted")
    assert suite.request_for(tiny_engine, "ties", "es")[0].method == "ties"
    assert suite.request_for(tiny_engine, "linear", "ru") == (None, "lang-ru not trained")
    assert suite.request_for(tiny_engine, "task", None, task="code") == (None, "not trained")


# ---------------------------------------------------------------------------- the command
def _args(tmp_path, *extra):
    parser = argparse.ArgumentParser()
    suite.add_eval_arguments(parser)
    return parser.parse_args(
        [
            "--suite",
            "math",
            "-n",
            "2",
            "--langs",
            "en",
            "es",
            "--code-n",
            "0",
            "--max-new-tokens",
            "4",
            "--batch-size",
            "2",
            "--threads",
            "1",
            "--cache",
            str(tmp_path / "cache.json"),
            "--out",
            str(tmp_path / "results.md"),
            *extra,
        ]
    )


def test_eval_command_writes_table_and_resumes(tiny_engine, tmp_path, monkeypatch, capsys):
    args = _args(tmp_path)
    assert suite.cmd_eval(args, engine=tiny_engine, argv=["eval", "-n", "2"]) == 0
    text = (tmp_path / "results.md").read_text()
    assert report.BEGIN in text and report.END in text
    assert "`python -m lab eval -n 2`" in text
    assert "| Base | " in text and "/2 = " in text and "mean (es)" in text
    assert "— (not fitted)" in text  # no fitted fusions in this library
    cache = json.loads((tmp_path / "cache.json").read_text())
    done = {k for k in cache if k.startswith("math|")}
    # base en/es, lang es, task en/es, linear es, ties es
    assert len(done) == 7

    # a hand-written part of the file outside the markers survives a rewrite
    (tmp_path / "results.md").write_text(
        "# Results\n\nintro\n\n" + text[text.index(report.BEGIN) :] + "\n## Judgement\nmine\n"
    )
    calls = []
    real = suite.greedy_replies

    def counting(engine, request, questions, *a, **k):
        calls.append(request.key())
        return real(engine, request, questions, *a, **k)

    monkeypatch.setattr(suite, "greedy_replies", counting)
    suite.cmd_eval(args, engine=tiny_engine, argv=["eval"])
    assert calls == []  # everything came from the cache
    assert "intro" in (tmp_path / "results.md").read_text() and "mine" in (tmp_path / "results.md").read_text()

    # an interrupted cell (one problem of two cached) continues with the missing problem only
    key = next(k for k in done if k.startswith("math|ties|es"))
    cache[key]["items"] = cache[key]["items"][:1]
    (tmp_path / "cache.json").write_text(json.dumps(cache))
    suite.cmd_eval(args, engine=tiny_engine, argv=["eval"])
    assert len(calls) == 1
    # a refitted/changed adapter invalidates its cells
    calls.clear()
    first = json.loads((tmp_path / "cache.json").read_text())
    assert first[key]["items"][0] == cache[key]["items"][0]
    monkeypatch.setattr(suite, "fingerprint", lambda engine, request: "changed")
    suite.cmd_eval(_args(tmp_path, "--rows", "base", "task"), engine=tiny_engine, argv=["eval"])
    assert len(calls) == 4  # base en/es, task en/es: one batch of two problems each


def test_app_default_uses_fitted_gates(tiny_engine):
    from lab.fusions import build_fusions
    from ui.choices import default_selection

    before = default_selection(tiny_engine)
    assert (before["language"], before["task"], before["method"]) == ("lang-es", "task-math", "lora_flow")
    assert before["fusion"] == "(none)"
    build_fusions(
        tiny_engine,
        langs=("es",),
        methods=("lora_flow",),
        mixlora=False,
        max_steps=1,
        examples=4,
        progress_bar=False,
        log=lambda *a: None,
    )
    assert default_selection(tiny_engine)["fusion"] == "es-math-flow"


@pytest.mark.parametrize("lang", mfd.FIT_LANGUAGES)
def test_fit_distribution_problems_use_fitting_templates_with_held_out_numbers(lang):
    problems = suite.fit_distribution_problems(lang, 30, seed=0)
    fit_ids = {t.id for t in mfd.FIT_TEMPLATES}
    fitted = {(e.program, e.numbers) for e in mfd.fit_examples(lang, 200, seed=0)}
    assert len(problems) == 30 and all(p.template in fit_ids and p.language == lang for p in problems)
    for p in problems:
        assert md.number_split(p.program, dict(p.numbers)) == "eval"
        assert (p.program, p.numbers) not in fitted


def test_fit_split_diagnostic_leaves_results_file_alone(tiny_engine, tmp_path, capsys):
    args = _args(tmp_path, "--split", "fit", "--rows", "base", "task")
    assert suite.cmd_eval(args, engine=tiny_engine, argv=["eval", "--split", "fit"]) == 0
    assert not (tmp_path / "results.md").exists()
    out = capsys.readouterr().out
    assert "| Base | — (no fitting templates) | " in out and "/2 = " in out
    cache = json.loads((tmp_path / "cache.json").read_text())
    assert sorted(cache) == ["math-fit|base|es|seed=0|tokens=4", "math-fit|task|es|seed=0|tokens=4"]


def test_single_adapter_evaluations_decode_in_the_scheduler(tiny_engine, tmp_path):
    """`lab eval-math/-lang/-code --adapter DIR`: the folder's adapter alone, through the engine
    (its scheduler), giving what a solo decoding loop under that adapter gives."""
    from fusion.errors import FusionError
    from lab.__main__ import _engine_and_request
    from lab.evaluate_math import evaluate_math

    folder = tiny_engine.library_folders().adapters
    args = argparse.Namespace(adapter=f"{folder}/task-math", threads=torch.get_num_threads())
    engine, request = _engine_and_request(args, base=tiny_engine.base)
    assert (request.adapters, request.method) == (["task-math"], "single")
    assert {a["name"] for a in engine.adapters()} == {"lang-es", "task-math"}
    assert engine.fusions() == []
    result = evaluate_math(engine, request, lang="es", n=3, max_new_tokens=5)
    solo = solo_replies(engine, request, [item["question"] for item in result["items"]], 5)
    assert [item["reply"] for item in result["items"]] == solo
    assert result["n"] == 3 and result["correct"] == sum(item["correct"] for item in result["items"])
    (tmp_path / "not-an-adapter").mkdir()
    for bad, says in ((tmp_path / "missing", "no such folder"), (tmp_path / "not-an-adapter", "not-an-adapter")):
        with pytest.raises(FusionError, match=says):
            _engine_and_request(argparse.Namespace(adapter=str(bad), threads=1), base=tiny_engine.base)
