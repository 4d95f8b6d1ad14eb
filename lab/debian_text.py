"""Language data from Debian's documentation and fortune packages (installed offline with apt).

Target-language prose written by people for people, turned into chat examples whose instruction
and answer are in the target language:

* **translation**, both directions, from paragraphs that are parallel with English: the
  Debian installation guide (``installation-guide-amd64``: the same HTML pages in en, es, ru and
  zh_CN) and the Debian Reference (``debian-reference-en`` with ``-es`` / ``-zh-cn``);
* **continuation** of a paragraph or a saying from its first half (the same paragraphs and the
  fortune files of ``fortunes-es``, ``fortunes-ru``, ``fortunes-zh``);
* **question answering over a passage**: the title of the section a paragraph belongs to;
  for Spanish, also "a saying about <topic>" from the topic-named fortune files.

Only paragraphs whose text is in the expected language pass (untranslated English left in a
translation is dropped), and none with digits, so the language data holds no arithmetic.
Paragraphs are aligned by position within a page, and only on pages where both languages have
the same number of paragraphs. Every source is GPL (see docs/data.md).

A missing package stops the build with one line naming it: the data is never half built.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

from fusion.errors import FusionError

from .scoring import in_language

LANGUAGES = ("es", "ru", "zh")
GUIDE = "usr/share/doc/installation-guide-amd64"
REFERENCE = "usr/share/debian-reference"
FORTUNES = "usr/share/games/fortunes"
GUIDE_DIR = {"en": "en", "es": "es", "ru": "ru", "zh": "zh_CN"}
REFERENCE_SUFFIX = {"en": "en", "es": "es", "zh": "zh-cn"}

# package -> a path it installs (relative to the file-system root)
MARKERS = {
    "installation-guide-amd64": f"{GUIDE}/en",
    "debian-reference-en": f"{REFERENCE}/ch01.en.html",
    "debian-reference-es": f"{REFERENCE}/ch01.es.html",
    "debian-reference-zh-cn": f"{REFERENCE}/ch01.zh-cn.html",
    "fortunes-es": f"{FORTUNES}/es",
    "fortunes-ru": f"{FORTUNES}/ru",
    "fortunes-zh": f"{FORTUNES}/chinese.u8",
}
PACKAGES = {
    "es": ("installation-guide-amd64", "debian-reference-en", "debian-reference-es", "fortunes-es"),
    "ru": ("installation-guide-amd64", "fortunes-ru"),
    "zh": ("installation-guide-amd64", "debian-reference-en", "debian-reference-zh-cn", "fortunes-zh"),
}

INSTRUCTIONS = {
    "to_lang": {
        "es": ["Traduce al español:", "Traduce este texto al español:", "¿Cómo se dice esto en español?"],
        "ru": ["Переведи на русский:", "Переведи этот текст на русский язык:", "Как это сказать по-русски?"],
        "zh": ["翻译成中文：", "请把这段话翻译成中文：", "这段话用中文怎么说？"],
    },
    "to_en": {
        "es": ["Traduce al inglés:", "Traduce este texto al inglés:"],
        "ru": ["Переведи на английский:", "Переведи этот текст на английский язык:"],
        "zh": ["翻译成英文：", "请把这段话翻译成英文："],
    },
    "continue": {
        "es": ["Continúa este texto:", "Escribe cómo sigue este texto:", "Completa el texto:"],
        "ru": ["Продолжи текст:", "Напиши, как продолжается этот текст:", "Закончи текст:"],
        "zh": ["请接着写下去：", "续写这段文字：", "把这段话补充完整："],
    },
    "title": {
        "es": ["Lee el texto y escribe un título adecuado para él.", "¿Qué título le pondrías a este texto?"],
        "ru": ["Прочитай текст и придумай к нему подходящий заголовок.", "Какой заголовок подойдёт к этому тексту?"],
        "zh": ["阅读这段文字，给它起一个合适的标题。", "这段文字的标题应该是什么？"],
    },
}
ES_TOPICS = {
    "amistad": "la amistad",
    "arte": "el arte",
    "ciencia": "la ciencia",
    "familia": "la familia",
    "filosofia": "la filosofía",
    "libertad": "la libertad",
    "poder": "el poder",
    "sabiduria": "la sabiduría",
    "sentimientos": "los sentimientos",
    "verdad": "la verdad",
    "vida": "la vida",
    "humanos": "los seres humanos",
}
ES_TOPIC_ASK = [
    "Dime una frase célebre sobre {t}.",
    "¿Conoces alguna cita sobre {t}?",
    "Escribe una frase sabia sobre {t}.",
]

_DIGIT = re.compile(r"\d")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_SENTENCE_END = {
    "es": re.compile(r"(?<=[^.][.!?])\s+"),
    "ru": re.compile(r"(?<=[^.][.!?])\s+"),
    "zh": re.compile(r"(?<=[。！？])"),
}
# Characters per paragraph: long enough to be prose, short enough for 256-token examples.
LENGTH = {"es": (60, 400), "ru": (60, 240), "zh": (20, 100), "en": (40, 360)}
MIN_HALF = {"es": 20, "ru": 20, "zh": 8}


@dataclass(frozen=True)
class Paragraph:
    text: str
    title: str
    source: str


class _Paragraphs(HTMLParser):
    """The text of every <p> (outside <pre>), with the latest heading above it."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.out: list[tuple[str, str]] = []
        self.title = ""
        self._para: list[str] | None = None
        self._head: list[str] | None = None
        self._pre = 0

    def handle_starttag(self, tag, attrs):
        if tag in ("pre", "script", "style"):
            self._pre += 1
        elif tag == "p" and self._para is None:
            self._para = []
        elif tag in ("h1", "h2", "h3", "h4"):
            self._head = []

    def handle_endtag(self, tag):
        if tag in ("pre", "script", "style"):
            self._pre = max(0, self._pre - 1)
        elif tag == "p" and self._para is not None:
            self.out.append((" ".join("".join(self._para).split()), self.title))
            self._para = None
        elif tag in ("h1", "h2", "h3", "h4") and self._head is not None:
            # "6.3.2. Título" -> "Título"
            self.title = re.sub(r"^[\dA-Z.\s]*\.\s+", "", " ".join("".join(self._head).split()))
            self._head = None

    def handle_data(self, data):
        if self._pre:
            return
        if self._head is not None:
            self._head.append(data)
        if self._para is not None:
            self._para.append(data)


def html_paragraphs(path: Path) -> list[tuple[str, str]]:
    parser = _Paragraphs()
    parser.feed(path.read_text(encoding="utf-8", errors="replace"))
    return parser.out


def require(lang: str, root: str | Path = "/") -> None:
    if lang not in PACKAGES:
        raise FusionError(f"no Debian language data for {lang!r}; choose from {', '.join(LANGUAGES)}")
    for package in PACKAGES[lang]:
        marker = Path(root) / MARKERS[package]
        if not marker.exists():
            raise FusionError(
                f"Debian package {package} is not installed ({marker} is missing); "
                f"install it with: apt-get install {package}"
            )


def _usable(text: str, lang: str) -> bool:
    low, high = LENGTH[lang]
    return low <= len(text) <= high and not _DIGIT.search(text) and in_language(text, lang)


def parallel_paragraphs(lang: str, root: str | Path = "/") -> list[tuple[Paragraph, Paragraph]]:
    """(English, target) paragraph pairs from the installation guide and the Debian Reference."""
    root = Path(root)
    page_pairs = []
    guide = root / GUIDE
    for en_page in sorted((guide / GUIDE_DIR["en"]).glob("*.html")):
        page_pairs.append(("installation-guide", en_page, guide / GUIDE_DIR[lang] / en_page.name))
    if lang in REFERENCE_SUFFIX:
        for en_page in sorted((root / REFERENCE).glob("*.en.html")):
            other = en_page.with_name(en_page.name.replace(".en.", f".{REFERENCE_SUFFIX[lang]}."))
            page_pairs.append(("debian-reference", en_page, other))
    pairs = []
    for source, en_page, page in page_pairs:
        if not page.is_file():
            continue
        en_paras, paras = html_paragraphs(en_page), html_paragraphs(page)
        if len(en_paras) != len(paras):
            continue
        for (en_text, en_title), (text, title) in zip(en_paras, paras):
            if _usable(en_text, "en") and _usable(text, lang):
                pairs.append(
                    (
                        Paragraph(en_text, en_title, f"{source}/{en_page.name}"),
                        Paragraph(text, title, f"{source}/{page.name}"),
                    )
                )
    return pairs


def _fortune_files(lang: str, root: Path) -> list[Path]:
    base = root / FORTUNES
    if lang == "es":
        return sorted(p for p in (base / "es").glob("*.fortunes.u8"))
    if lang == "ru":
        return sorted((base / "ru").glob("*.u8"))
    return [base / "chinese.u8"]


def fortunes(lang: str, root: str | Path = "/") -> list[tuple[str, str]]:
    """(text, file topic) of every usable fortune; attributions and colour codes removed."""
    out = []
    joiner = "" if lang == "zh" else " "
    for path in _fortune_files(lang, Path(root)):
        topic = path.name.split(".")[0]
        for entry in _ANSI.sub("", path.read_text(encoding="utf-8", errors="replace")).split("\n%\n"):
            lines = [line.strip() for line in entry.splitlines() if line.strip() and not line.strip().startswith("--")]
            text = joiner.join(lines).strip()
            if _usable(text, lang):
                out.append((text, topic))
    return out


def split_in_two(text: str, lang: str) -> tuple[str, str] | None:
    """Split at the sentence boundary nearest the middle (None if there is no such boundary)."""
    parts = [p for p in _SENTENCE_END[lang].split(text) if p.strip()]
    if len(parts) < 2:
        return None
    best, cut = None, 0
    for i in range(1, len(parts)):
        size = len("".join(parts[:i]))
        if best is None or abs(size - len(text) / 2) < abs(best - len(text) / 2):
            best, cut = size, i
    joiner = "" if lang == "zh" else " "
    first, second = joiner.join(parts[:cut]).strip(), joiner.join(parts[cut:]).strip()
    if min(len(first), len(second)) < MIN_HALF[lang]:
        return None
    return first, second


def _turn(instruction: str, passage: str | None, answer: str, kind: str, source: str) -> dict:
    prompt = instruction if passage is None else f"{instruction}\n\n{passage}"
    return {
        "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
        "kind": kind,
        "source": source,
    }


def build_examples(lang: str, seed: int = 0, root: str | Path = "/", per_kind: int = 600) -> list[dict]:
    """Chat examples for the language LoRA of `lang`, at most `per_kind` of each kind, shuffled.

    Each record is {"messages": [user, assistant], "kind", "source"}."""
    require(lang, root)
    rng = random.Random(f"debian:{lang}:{seed}")
    pairs = parallel_paragraphs(lang, root)
    sayings = fortunes(lang, root)
    if not pairs and not sayings:
        raise FusionError(f"no usable {lang} text found under {root} (are the Debian packages complete?)")
    ask = INSTRUCTIONS
    kinds: dict[str, list[dict]] = {"to_lang": [], "to_en": [], "continue": [], "title": [], "topic": []}
    for en, xx in pairs:
        kinds["to_lang"].append(_turn(rng.choice(ask["to_lang"][lang]), en.text, xx.text, "to_lang", xx.source))
        kinds["to_en"].append(_turn(rng.choice(ask["to_en"][lang]), xx.text, en.text, "to_en", xx.source))
        halves = split_in_two(xx.text, lang)
        if halves:
            kinds["continue"].append(
                _turn(rng.choice(ask["continue"][lang]), halves[0], halves[1], "continue", xx.source)
            )
        if xx.title and in_language(xx.title, lang) and not _DIGIT.search(xx.title):
            kinds["title"].append(_turn(rng.choice(ask["title"][lang]), xx.text, xx.title, "title", xx.source))
    for text, topic in sayings:
        halves = split_in_two(text, lang)
        if halves:
            kinds["continue"].append(
                _turn(rng.choice(ask["continue"][lang]), halves[0], halves[1], "continue", f"fortunes-{lang}/{topic}")
            )
        if lang == "es" and topic in ES_TOPICS:
            kinds["topic"].append(
                _turn(rng.choice(ES_TOPIC_ASK).format(t=ES_TOPICS[topic]), None, text, "topic", f"fortunes-es/{topic}")
            )
    records = []
    for kind, items in kinds.items():
        rng.shuffle(items)
        # Fewer answers in English than in the language: the LoRA is to answer in the language.
        records += items[: per_kind // 3 if kind == "to_en" else per_kind]
    rng.shuffle(records)
    return records
