"""Does a model answer in the language it was asked in? A quick check for the language LoRAs.

Twelve everyday questions per language (written for this project; no overlap with the
software-message training data), greedy replies, and the share of replies written in the
question's language: by script for Russian (Cyrillic) and Chinese (Han), by py3langid for
Spanish (`lab.scoring.in_language`). Replies that merely repeat the question are
counted separately (``echo``).
"""

from __future__ import annotations

import re

from .evaluate_math import generate_replies

QUESTIONS = {
    "es": [
        "¿Qué puedo cocinar esta noche con arroz y verduras?",
        "Escribe un mensaje corto para felicitar a un amigo por su cumpleaños.",
        "¿Por qué es importante dormir bien?",
        "Dame tres consejos para aprender un idioma nuevo.",
        "Describe tu ciudad favorita en pocas frases.",
        "¿Qué ropa debo llevar si va a llover mañana?",
        "Explica qué es la fotosíntesis de forma sencilla.",
        "Escribe una invitación breve a una cena con amigos.",
        "¿Cómo puedo cuidar una planta en casa?",
        "¿Qué hago si pierdo las llaves de casa?",
        "Cuéntame algo interesante sobre el mar.",
        "Recomiéndame un libro y explica por qué.",
    ],
    "ru": [
        "Что можно приготовить на ужин из риса и овощей?",
        "Напиши короткое поздравление другу с днём рождения.",
        "Почему важно хорошо высыпаться?",
        "Дай три совета, как выучить новый язык.",
        "Опиши свой любимый город в нескольких предложениях.",
        "Что надеть, если завтра будет дождь?",
        "Объясни простыми словами, что такое фотосинтез.",
        "Напиши короткое приглашение на ужин с друзьями.",
        "Как ухаживать за комнатным растением?",
        "Что делать, если я потерял ключи от дома?",
        "Расскажи что-нибудь интересное о море.",
        "Посоветуй книгу и объясни почему.",
    ],
    "zh": [
        "用米饭和蔬菜今晚可以做什么菜？",
        "写一条简短的生日祝福给朋友。",
        "为什么睡个好觉很重要？",
        "给我三个学习新语言的建议。",
        "用几句话描述你最喜欢的城市。",
        "如果明天下雨，我应该穿什么？",
        "用简单的话解释什么是光合作用。",
        "写一份简短的朋友聚餐邀请。",
        "在家里怎样照顾一盆植物？",
        "如果我丢了家里的钥匙怎么办？",
        "给我讲一件关于大海的有趣的事。",
        "推荐一本书并说明理由。",
    ],
}


def in_language(text: str, lang: str) -> bool:
    """The detector of the math evaluation (scripts for ru/zh, py3langid for es)."""
    from .scoring import in_language as detect

    return detect(text, lang)


def evaluate_language(engine, request, lang: str, max_new_tokens: int = 48) -> dict:
    qs = QUESTIONS[lang]
    replies = generate_replies(engine, request, qs, max_new_tokens)
    items = [
        {"question": q, "reply": r, "in_language": in_language(r, lang), "echo": is_echo(q, r)}
        for q, r in zip(qs, replies)
    ]
    hits = sum(it["in_language"] for it in items)
    answered = sum(it["in_language"] and not it["echo"] for it in items)
    return {"lang": lang, "n": len(items), "in_language": hits, "in_language_not_echo": answered, "items": items}


def is_echo(question: str, reply: str) -> bool:
    """The reply merely starts by repeating the question (a common failure of the base model)."""
    q = re.sub(r"\W", "", question)[:12]
    return bool(q) and re.sub(r"\W", "", reply).startswith(q)
