"""General (non-math) chat data in Spanish, Russian and Chinese, built offline.

Source: the human-made gettext translation catalogs (``*.po``) shipped inside two PyPI wheels,
Django (BSD-3-Clause) and Sphinx (BSD-2-Clause). Each catalog pairs an English message with its
translation by the projects' volunteer translators. We keep plain sentences (no markup,
placeholders, URLs or digits), and turn each pair into a chat turn whose instruction is written
in the target language and whose answer is the target-language sentence, e.g.

    user:      Traduce al español: «This field is required.»
    assistant: Este campo es obligatorio.

The packages are read from disk (``importlib.util.find_spec``); neither is imported.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import random
import re
from pathlib import Path

LANGUAGES = ("es", "ru", "zh")

# catalog folder names per language, in each package
_CATALOG_DIRS = {"es": ("es",), "ru": ("ru",), "zh": ("zh_Hans", "zh_CN")}
SOURCES = {
    "django": "Django 5.2.17 (BSD-3-Clause): django/conf/locale and django/contrib/*/locale",
    "sphinx": "Sphinx 9.0.4 (BSD-2-Clause): sphinx/locale",
}

INSTRUCTIONS = {
    "es": [
        "Traduce al español: «{en}»",
        "¿Cómo se dice en español? «{en}»",
        "Escribe esta frase en español: {en}",
        "Necesito este mensaje en español, por favor: «{en}»",
        "Tradúceme al castellano: {en}",
    ],
    "ru": [
        "Переведи на русский: «{en}»",
        "Как сказать по-русски: «{en}»?",
        "Напиши эту фразу на русском языке: {en}",
        "Пожалуйста, переведи это сообщение на русский: «{en}»",
        "Переведи на русский язык: {en}",
    ],
    "zh": [
        "把这句话翻译成中文：“{en}”",
        "请用中文表达：“{en}”",
        "这句话用中文怎么说？“{en}”",
        "请把下面的信息翻译成简体中文：{en}",
        "翻译成中文：{en}",
    ],
}

_BAD = re.compile(r"%|\{|\}|<|>|https?:|www\.|\\|\d|_|\||`|\*|=|\[|\]")
_CJK = re.compile(r"[\u4e00-\u9fff]")
_CYRILLIC = re.compile(r"[\u0400-\u04ff]")


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"package {name!r} is not installed; it ships the language data (see requirements.txt and docs/data.md)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def catalog_files(lang: str) -> list[Path]:
    files = []
    for pkg in SOURCES:
        root = package_dir(pkg)
        for d in _CATALOG_DIRS[lang]:
            files += sorted(root.glob(f"**/locale/{d}/LC_MESSAGES/*.po"))
    return files


def _unquote(s: str) -> str:
    return ast.literal_eval(s) if s.startswith('"') else ""


def parse_po(text: str) -> list[tuple[str, str]]:
    """(msgid, msgstr) pairs of a gettext catalog; fuzzy, obsolete and untranslated entries dropped.

    For plural entries the singular forms (msgid, msgstr[0]) are used.
    """
    pairs = []
    for block in re.split(r"\n\s*\n", text):
        lines = [ln.strip() for ln in block.strip().splitlines()]
        if any(ln.startswith("#,") and "fuzzy" in ln for ln in lines):
            continue
        fields, key = {}, None
        for ln in lines:
            if ln.startswith("#~") or not ln:
                key = None if ln.startswith("#~") else key
                continue
            if ln.startswith("#"):
                continue
            m = re.match(r"^(msgctxt|msgid_plural|msgid|msgstr(?:\[\d+\])?)\s+(\".*\")$", ln)
            if m:
                key = m.group(1)
                fields[key] = _unquote(m.group(2))
            elif ln.startswith('"') and key:
                fields[key] += _unquote(ln)
        en = fields.get("msgid", "")
        tr = fields.get("msgstr", fields.get("msgstr[0]", ""))
        if en and tr:
            pairs.append((en, tr))
    return pairs


def _keep(lang: str, en: str, tr: str) -> bool:
    if _BAD.search(en) or _BAD.search(tr) or "\n" in en or "\n" in tr:
        return False
    letters = len(re.findall(r"[^\W\d_]", tr))
    if lang == "zh":
        return len(_CJK.findall(tr)) >= max(4, 0.6 * letters) and len(en.split()) >= 3
    if lang == "ru" and len(_CYRILLIC.findall(tr)) < 0.7 * letters:
        return False
    return len(tr.split()) >= 3 and len(en.split()) >= 3 and tr != en


def sentence_pairs(lang: str) -> list[tuple[str, str]]:
    """Deduplicated (English, target) sentence pairs for one language, in a stable order."""
    return list(_sentence_pairs(lang))


@functools.cache
def _sentence_pairs(lang: str) -> tuple[tuple[str, str], ...]:
    if lang not in LANGUAGES:
        raise ValueError(f"unknown language {lang!r}; choose from {LANGUAGES}")
    seen, out = set(), []
    for f in catalog_files(lang):
        for en, tr in parse_po(f.read_text(encoding="utf-8")):
            en, tr = " ".join(en.split()), " ".join(tr.split())
            if _keep(lang, en, tr) and tr not in seen:
                seen.add(tr)
                out.append((en, tr))
    return tuple(out)


def train_examples(lang: str, seed: int = 0) -> list[list[dict]]:
    """Chat examples (user instruction in the target language, answer = the translation)."""
    rng = random.Random(f"lang:{lang}:{seed}")
    exs = []
    for en, tr in sentence_pairs(lang):
        q = rng.choice(INSTRUCTIONS[lang]).format(en=en)
        exs.append([{"role": "user", "content": q}, {"role": "assistant", "content": tr}])
    rng.shuffle(exs)
    return exs
