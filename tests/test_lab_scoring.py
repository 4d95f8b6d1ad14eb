"""The math evaluation's scorer: final number, reply language, McNemar's exact test and its power."""

import math

import pytest

from lab import scoring


@pytest.mark.parametrize(
    "b,c,expected",
    [
        (0, 0, 1.0),
        (0, 5, 0.0625),  # 2 / 2**5
        (1, 9, 0.021484375),  # 2 * (1 + 10) / 2**10
        (3, 3, 1.0),
        (9, 1, 0.021484375),  # symmetric
        (0, 6, 0.03125),
        (7, 20, 0.0191572904586792),
    ],
)
def test_mcnemar_exact_known_values(b, c, expected):
    assert scoring.mcnemar_exact(b, c) == pytest.approx(expected, rel=1e-12)


def test_mcnemar_exact_equals_binomial_test():
    stats = pytest.importorskip("scipy.stats")
    for b, c in [(2, 11), (30, 12), (55, 80), (100, 100), (0, 40)]:
        assert scoring.mcnemar_exact(b, c) == pytest.approx(stats.binomtest(b, b + c, 0.5).pvalue, rel=1e-9)


def test_mcnemar_refuses_negative_counts():
    with pytest.raises(ValueError):
        scoring.mcnemar_exact(-1, 3)


def test_discordant_pairs():
    first = [True, True, False, False, True]
    second = [True, False, True, False, False]
    assert scoring.discordant(first, second) == (2, 1)
    with pytest.raises(ValueError, match="differ in length"):
        scoring.discordant([True], [True, False])


def test_mcnemar_power_exact_small_cases():
    # Every problem discordant in favour of the first: 5 wins give p = 0.0625 (never below
    # 0.05), 6 wins give p = 0.03125 (always).
    assert scoring.mcnemar_power(5, 1.0, 0.0) == pytest.approx(0.0)
    assert scoring.mcnemar_power(6, 1.0, 0.0) == pytest.approx(1.0)
    # Half the problems are wins, the rest ties: only 6 wins out of 6 rejects.
    assert scoring.mcnemar_power(6, 0.5, 0.0) == pytest.approx(0.5**6)
    # No difference: the exact test is conservative, so it rejects less often than alpha.
    assert 0 < scoring.mcnemar_power(200, 0.1, 0.1) < 0.05
    # 600 problems, 10 % discordant, a 5-point difference: normal approximation ~0.97.
    z = 0.05 * 600 / math.sqrt(0.10 * 600) - 1.959964
    normal = 0.5 * (1 + math.erf(z / math.sqrt(2)))
    assert scoring.mcnemar_power(600, 0.075, 0.025) == pytest.approx(normal, abs=0.02)


@pytest.mark.parametrize(
    "text,lang,expected",
    [
        ("72 + 22 = 94. La respuesta es 94.", "es", True),
        ("72 + 22 = 94. The answer is 94.", "es", False),
        ("72 + 22 = 94. The answer is 94.", "en", True),
        ("Puedes cocinar arroz frito con las verduras de la nevera.", "es", True),
        ("You can cook fried rice with the vegetables.", "es", False),
        ("Lucía tiene 15 libros y regala 6, así que le quedan 9.", "es", True),
        ("15 + 6 = 21. The answer is 21.", "es", False),
        ("72 + 22 = 94. Ответ: 94.", "ru", True),
        ("72 + 22 = 94. The answer is 94.", "ru", False),
        ("72 + 22 = 94. 答案是94。", "zh", True),
        ("72 + 22 = 94. The answer is 94.", "zh", False),
        ("72 + 22 = 94.", "es", False),  # no words: in no language
        ("", "ru", False),
    ],
)
def test_reply_language(text, lang, expected):
    assert scoring.in_language(text, lang) is expected


def test_reply_language_unknown_language():
    with pytest.raises(ValueError, match="no language detector for 'fr'"):
        scoring.in_language("Bonjour", "fr")


def test_score_reply_two_scores():
    right_es = scoring.score_reply("15 - 6 = 9. La respuesta es 9.", 9, "es")
    assert (right_es["got"], right_es["correct"], right_es["in_language"], right_es["joint"]) == (9, True, True, True)
    right_en = scoring.score_reply("15 - 6 = 9. The answer is 9.", 9, "es")
    assert (right_en["correct"], right_en["in_language"], right_en["joint"]) == (True, False, False)
    wrong_es = scoring.score_reply("15 + 6 = 21. La respuesta es 21.", 9, "es")
    assert (wrong_es["got"], wrong_es["correct"], wrong_es["joint"]) == (21, False, False)
    zh = scoring.score_reply("15 - 6 = 9. 答案是9。", 9, "zh")
    assert zh["joint"] is True


def test_mcnemar_report_table():
    from lab.report import mcnemar_table

    flow = {"correct": [True] * 8 + [False] * 2, "joint": [True] * 6 + [False] * 4}
    task = {"correct": [False] * 8 + [True] * 2, "joint": [False] * 10}
    results = {"paired": {"lora_flow": {"es": flow}, "task": {"es": task}}}
    text = mcnemar_table(results, ("en", "es"), compared=("task", "cat"))
    # es: 8 wins, 2 losses -> p = 2 * (1 + 10 + 45) / 1024
    assert f"| 8–2, p = {2 * 56 / 1024:.3g} | 8–2, p = {2 * 56 / 1024:.3g} |" in text
    assert "| 6–0, p = 0.0312 |" in text
    assert "| CAT (fitted) | final number | — | — |" in text
