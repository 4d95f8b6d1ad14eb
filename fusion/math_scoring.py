"""The final number a reply commits to, and whether it is the right one: the scorer of the
templated math problems (`math_data`), used by the app's scoring panel and by the lab."""

from __future__ import annotations

import re

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_ANSWER_IS = re.compile(
    r"(?:answer is|answer:|respuesta es|ответ[:\s]|答案是|答案[:：])\s*\**\s*(-?\d[\d,]*(?:\.\d+)?)", re.IGNORECASE
)


def final_number(text: str) -> float | None:
    """The number a reply commits to: after "The answer is" (or its translations), else the last number."""
    m = _ANSWER_IS.findall(text)
    cands = m or _NUMBER.findall(text)
    if not cands:
        return None
    raw = cands[-1].replace(",", "")
    try:
        return float(raw)
    except ValueError:
        return None


def is_correct(reply: str, value: int) -> bool:
    got = final_number(reply)
    return got is not None and abs(got - value) < 1e-6
