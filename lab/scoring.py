"""Scoring the math replies: the final number, the reply's language, and paired comparisons.

Two scores per reply: `correct` (the final number equals the answer) and `joint` (correct *and*
written in the question's language). Language: by script for Russian (Cyrillic) and Chinese
(Han); for Spanish and English by py3langid (a maintained fork of langid.py, BSD-3-Clause,
whose model ships inside the wheel as plain arrays, loaded without pickle), restricted to the
candidate languages of `CANDIDATES`, so that a short reply is not sent to a near-identical variety.

Methods are compared on the same problems with McNemar's exact test: only the problems on which
exactly one of the two is right count, and under "no difference" each of those discordant
problems is a fair coin.
"""

from __future__ import annotations

import math
import re

# The languages a reply is told apart among. Galician, Catalan and Portuguese are left out on
# purpose: on a short Spanish sentence their scores are within noise of Spanish's ("Un corazón
# que habita en dos almas" ranks Galician first), and what the score asks is "Spanish rather
# than English (or anything far from it)".
CANDIDATES = ("en", "es", "fr", "it", "de", "nl", "ru", "uk", "zh", "ja")

_LETTERS = re.compile(r"[^\W\d_]")
_CYRILLIC = re.compile(r"[\u0400-\u04ff]")
_HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_IDENTIFIER = None


def _identifier():
    global _IDENTIFIER
    if _IDENTIFIER is None:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier

        identifier = LanguageIdentifier.from_model_file(MODEL_FILE)
        identifier.set_languages(list(CANDIDATES))
        _IDENTIFIER = identifier
    return _IDENTIFIER


def script_share(text: str, pattern: re.Pattern) -> float:
    letters = _LETTERS.findall(text)
    return len(pattern.findall(text)) / len(letters) if letters else 0.0


def in_language(text: str, lang: str) -> bool:
    """Is `text` written in `lang` (en, es, ru or zh)? Text without letters is in no language."""
    if lang == "ru":
        return script_share(text, _CYRILLIC) >= 0.5
    if lang == "zh":
        return script_share(text, _HAN) >= 0.5
    if lang in ("es", "en"):
        words = " ".join(re.findall(r"[^\W\d_]+", text))
        if not words:
            return False
        return _identifier().classify(words)[0] == lang
    raise ValueError(f"no language detector for {lang!r}")


def score_reply(reply: str, value: int, lang: str) -> dict:
    from .evaluate_math import final_number, is_correct

    correct = is_correct(reply, value)
    language = in_language(reply, lang)
    return {"got": final_number(reply), "correct": correct, "in_language": language, "joint": correct and language}


# ---------------------------------------------------------------------------- McNemar
def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts b (only the first method right)
    and c (only the second): 2 * P(X <= min(b, c)) for X ~ Binomial(b + c, 1/2), capped at 1."""
    if b < 0 or c < 0:
        raise ValueError("discordant counts must be non-negative")
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2**n)


def discordant(first: list[bool], second: list[bool]) -> tuple[int, int]:
    """(b, c): problems only `first` got right, problems only `second` got right."""
    if len(first) != len(second):
        raise ValueError(f"paired results differ in length ({len(first)} vs {len(second)})")
    b = sum(1 for x, y in zip(first, second) if x and not y)
    c = sum(1 for x, y in zip(first, second) if y and not x)
    return b, c


def _log_binom_pmf(k: int, n: int, p: float) -> float:
    if p <= 0.0:
        return 0.0 if k == 0 else -math.inf
    if p >= 1.0:
        return 0.0 if k == n else -math.inf
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * math.log(p) + (n - k) * math.log1p(-p)


def mcnemar_power(n: int, p_only_first: float, p_only_second: float, alpha: float = 0.05) -> float:
    """Probability that the exact test rejects at `alpha` on n paired problems when each problem
    is, independently, right for the first method only with probability p_only_first and for
    the second only with p_only_second (exact enumeration over the discordant counts)."""
    discord = p_only_first + p_only_second
    if discord <= 0:
        return 0.0
    share = p_only_first / discord
    power = 0.0
    for m in range(1, n + 1):
        weight = math.exp(_log_binom_pmf(m, n, discord))
        if weight < 1e-15:
            continue
        # The rejection region is symmetric: b <= k or b >= m - k, k the largest with p < alpha.
        k, tail = -1, 0.0
        while k + 1 <= m // 2:
            nxt = tail + math.exp(_log_binom_pmf(k + 1, m, 0.5))
            if min(1.0, 2 * nxt) >= alpha:
                break
            k, tail = k + 1, nxt
        if k < 0:
            continue
        low = sum(math.exp(_log_binom_pmf(b, m, share)) for b in range(k + 1))
        high = sum(math.exp(_log_binom_pmf(b, m, share)) for b in range(m - k, m + 1))
        power += weight * (low + high)
    return power
