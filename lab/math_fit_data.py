"""Target-language math problems for fitting fusions (LoRA-Flow gates, CAT, LoraHub, MixLoRA).

LoRA-Flow fits its gates on a couple of hundred examples of the task *in the target language*.
These are built from *training* templates only: Spanish, Russian and Chinese versions of ten of
the English training templates of ``math_data`` (same ids with a language suffix, same
programs), never the evaluation templates. Numbers come from the "train" side of
``math_data.number_split``, so no (operation, operands) pair of a fitting example is ever an
evaluation problem's, whatever the seeds.

The worked answer keeps the arithmetic steps and ends with the answer sentence in the target
language ("La respuesta es 23.", "Ответ: 23.", "答案是23。"), which ``evaluate_math.final_number``
reads like the English one.
"""

from __future__ import annotations

from fusion.math_data import Template, _generate, solve

FIT_LANGUAGES = ("es", "ru", "zh")

ANSWER_SENTENCE = {"en": "The answer is {n}.", "es": "La respuesta es {n}.", "ru": "Ответ: {n}.", "zh": "答案是{n}。"}

# Translations of ten English training templates (t-pencils, t-cookies, t-boxes, t-share,
# t-marbles, t-train, t-points, t-apples, t-eggs, t-chairs): every program appears once.
_FIT = [
    (
        "t-pencils",
        "add",
        {
            "es": "{name} tiene {a} lápices y compra {b} más. ¿Cuántos lápices tiene {name} ahora?",
            "ru": "У {name_gen} {a} {a|карандаш|карандаша|карандашей}. {name} {g:купил|купила} ещё {b} {b|карандаш|карандаша|карандашей}. Сколько карандашей теперь у {name_gen}?",
            "zh": "{name}有{a}支铅笔，又买了{b}支。{name}现在有多少支铅笔？",
        },
    ),
    (
        "t-cookies",
        "sub",
        {
            "es": "{name} horneó {a} galletas y regaló {b}. ¿Cuántas galletas quedan?",
            "ru": "{name} {g:испёк|испекла} {a} {a|печенье|печенья|печений} и {g:отдал|отдала} {b}. Сколько печений осталось?",
            "zh": "{name}烤了{a}块饼干，送出去{b}块。还剩多少块饼干？",
        },
    ),
    (
        "t-boxes",
        "mul",
        {
            "es": "Hay {a} cajas con {b} naranjas en cada caja. ¿Cuántas naranjas hay?",
            "ru": "Есть {a} {a|коробка|коробки|коробок}, в каждой по {b} {b|апельсину|апельсина|апельсинов}. Сколько всего апельсинов?",
            "zh": "有{a}个盒子，每个盒子里有{b}个橙子。一共有多少个橙子？",
        },
    ),
    (
        "t-share",
        "div",
        {
            "es": "{name} reparte {a} caramelos a partes iguales entre {b} amigos. ¿Cuántos caramelos recibe cada amigo?",
            "ru": "{name} поровну делит {a} {a|конфету|конфеты|конфет} между {b} друзьями. Сколько конфет получит каждый друг?",
            "zh": "{name}把{a}颗糖平均分给{b}个朋友。每个朋友分到多少颗糖？",
        },
    ),
    (
        "t-marbles",
        "add_sub",
        {
            "es": "{name} tiene {a} canicas, gana {b} más en un juego y luego pierde {c}. ¿Cuántas canicas tiene {name} ahora?",
            "ru": "У {name_gen} было {a} {a|шарик|шарика|шариков}. {name} {g:выиграл|выиграла} ещё {b}, а потом {g:потерял|потеряла} {c}. Сколько шариков теперь у {name_gen}?",
            "zh": "{name}有{a}颗弹珠，在游戏中又赢了{b}颗，然后输掉了{c}颗。{name}现在有多少颗弹珠？",
        },
    ),
    (
        "t-train",
        "sub_add",
        {
            "es": "En un tren van {a} personas. En una estación bajan {b} personas y suben {c}. ¿Cuántas personas van en el tren?",
            "ru": "В поезде {a} {a|человек|человека|человек}. На станции {b} {b|человек вышел|человека вышли|человек вышли}, а {c} {c|человек вошёл|человека вошли|человек вошли}. Сколько человек теперь в поезде?",
            "zh": "火车上有{a}个人。到站时下去了{b}个人，又上来了{c}个人。火车上现在有多少人？",
        },
    ),
    (
        "t-points",
        "add_add",
        {
            "es": "{name} anotó {a} puntos en el primer partido, {b} en el segundo y {c} en el tercero. ¿Cuántos puntos anotó {name} en total?",
            "ru": "{name} {g:набрал|набрала} {a} {a|очко|очка|очков} в первой игре, {b} во второй и {c} в третьей. Сколько всего очков {g:набрал|набрала} {name}?",
            "zh": "{name}第一场比赛得了{a}分，第二场得了{b}分，第三场得了{c}分。{name}一共得了多少分？",
        },
    ),
    (
        "t-apples",
        "sub_sub",
        {
            "es": "{name} recogió {a} manzanas. Se comió {b} y le dio {c} a un vecino. ¿Cuántas manzanas quedan?",
            "ru": "{name} {g:собрал|собрала} {a} {a|яблоко|яблока|яблок}. {b} {g:он съел|она съела}, а {c} {g:отдал|отдала} соседу. Сколько яблок осталось?",
            "zh": "{name}摘了{a}个苹果，吃了{b}个，又给了邻居{c}个。还剩多少个苹果？",
        },
    ),
    (
        "t-eggs",
        "mul_add",
        {
            "es": "Un granjero llena {a} hueveras con {b} huevos cada una y le sobran {c} huevos. ¿Cuántos huevos tiene el granjero?",
            "ru": "Фермер заполнил {a} {a|лоток|лотка|лотков} по {b} {b|яйцу|яйца|яиц} в каждом, и у него осталось ещё {c} {c|яйцо|яйца|яиц}. Сколько всего яиц у фермера?",
            "zh": "一个农民装了{a}盒鸡蛋，每盒{b}个，还剩下{c}个鸡蛋。这个农民一共有多少个鸡蛋？",
        },
    ),
    (
        "t-chairs",
        "mul_sub",
        {
            "es": "Una sala tiene {a} filas de {b} sillas. Hay {c} sillas ocupadas. ¿Cuántas sillas están libres?",
            "ru": "В зале {a} {a|ряд|ряда|рядов} по {b} {b|стулу|стула|стульев}. Занято {c} {c|стул|стула|стульев}. Сколько стульев свободно?",
            "zh": "一个大厅有{a}排椅子，每排{b}把。已经有{c}把椅子有人坐了。还有多少把空椅子？",
        },
    ),
]

# Eight more training templates, so the gates see eighteen wordings rather than ten.
_FIT += [
    (
        "t-stickers",
        "add",
        {
            "es": "Un álbum tiene {a} pegatinas en la primera página y {b} en la segunda. ¿Cuántas pegatinas hay en las dos páginas?",
            "ru": "В альбоме на первой странице {a} {a|наклейка|наклейки|наклеек}, а на второй {b}. Сколько наклеек на обеих страницах?",
            "zh": "贴纸册第一页有{a}张贴纸，第二页有{b}张。两页一共有多少张贴纸？",
        },
    ),
    (
        "t-birds",
        "add",
        {
            "es": "Hay {a} pájaros en un árbol. Luego se posan {b} pájaros más. ¿Cuántos pájaros hay en el árbol?",
            "ru": "На дереве {a} {a|птица|птицы|птиц}. Потом прилетает ещё {b}. Сколько птиц теперь на дереве?",
            "zh": "树上有{a}只鸟，后来又飞来了{b}只。树上现在有多少只鸟？",
        },
    ),
    (
        "t-balloons",
        "sub",
        {
            "es": "Una tienda de fiestas tenía {a} globos. Vendió {b}. ¿Cuántos globos le quedan a la tienda?",
            "ru": "В магазине было {a} {a|воздушный шарик|воздушных шарика|воздушных шариков}. Продали {b}. Сколько шариков осталось в магазине?",
            "zh": "一家派对用品店有{a}个气球，卖掉了{b}个。店里还剩多少个气球？",
        },
    ),
    (
        "t-bus",
        "sub",
        {
            "es": "En un autobús van {a} pasajeros. En la siguiente parada se bajan {b}. ¿Cuántos pasajeros quedan en el autobús?",
            "ru": "В автобусе {a} {a|пассажир|пассажира|пассажиров}. На следующей остановке выходят {b}. Сколько пассажиров осталось в автобусе?",
            "zh": "公交车上有{a}名乘客，下一站下去了{b}名。车上还有多少名乘客？",
        },
    ),
    (
        "t-packs",
        "mul",
        {
            "es": "{name} compra {a} paquetes de cartas. Cada paquete tiene {b} cartas. ¿Cuántas cartas compra {name}?",
            "ru": "{name} {g:купил|купила} {a} {a|колоду|колоды|колод} карт, в каждой по {b} {b|карте|карты|карт}. Сколько всего карт {g:купил|купила} {name}?",
            "zh": "{name}买了{a}包卡片，每包有{b}张。{name}一共买了多少张卡片？",
        },
    ),
    (
        "t-teams",
        "div",
        {
            "es": "Un entrenador divide a {a} jugadores en {b} equipos iguales. ¿Cuántos jugadores hay en cada equipo?",
            "ru": "У тренера {a} {a|игрок|игрока|игроков}. Он делит их на {b} {b|равную команду|равные команды|равных команд}. Сколько игроков будет в каждой команде?",
            "zh": "教练把{a}名队员平均分成{b}个队。每个队有多少名队员？",
        },
    ),
    (
        "t-library",
        "add_sub",
        {
            "es": "Una biblioteca tiene {a} libros. Recibe {b} libros nuevos y presta {c}. ¿Cuántos libros quedan en la biblioteca?",
            "ru": "В библиотеке {a} {a|книга|книги|книг}. Она получила {b} {b|новую книгу|новые книги|новых книг} и выдала читателям {c}. Сколько книг осталось в библиотеке?",
            "zh": "图书馆有{a}本书，新到了{b}本，又借出去{c}本。图书馆里还有多少本书？",
        },
    ),
    (
        "t-fish",
        "sub_add",
        {
            "es": "En una pecera hay {a} peces. {name} regala {b} peces y luego compra {c} nuevos. ¿Cuántos peces hay en la pecera?",
            "ru": "В аквариуме {a} {a|рыбка|рыбки|рыбок}. {name} {g:отдал|отдала} {b}, а потом {g:купил|купила} ещё {c}. Сколько рыбок теперь в аквариуме?",
            "zh": "鱼缸里有{a}条鱼。{name}送出去{b}条，又买了{c}条新的。鱼缸里现在有多少条鱼？",
        },
    ),
]

FIT_TEMPLATES = [Template(f"{tid}-xx", program, dict(text)) for tid, program, text in _FIT]


def localized_answer(program: str, numbers: dict, lang: str) -> str:
    value, steps = solve(program, numbers)
    return ". ".join(steps) + ". " + ANSWER_SENTENCE[lang].format(n=value)


def fit_examples(lang: str, n: int = 200, seed: int = 0):
    """``n`` target-language training problems (MathExample) with localized worked answers."""
    from dataclasses import replace

    if lang not in FIT_LANGUAGES:
        raise ValueError(f"no fitting templates for language {lang!r}; choose from {FIT_LANGUAGES}")
    exs = _generate(FIT_TEMPLATES, lang, n, seed, "train")
    return [replace(e, answer=localized_answer(e.program, dict(e.numbers), lang)) for e in exs]


def fit_records(lang: str, n: int = 200, seed: int = 0) -> list[dict]:
    """The same examples as engine records ({"messages": [user, assistant]})."""
    return [{"messages": e.messages()} for e in fit_examples(lang, n, seed)]


def dev_records(lang: str, n: int = 60, seed: int = 0) -> list[dict]:
    """Dev problems (math_data.DEV_TEMPLATES) with localized answers, for choosing a fit's
    learning rate, batch size and checkpoint; disjoint from fitting and evaluation templates."""
    from dataclasses import replace

    from fusion.math_data import dev_examples

    return [
        {"messages": replace(e, answer=localized_answer(e.program, dict(e.numbers), lang)).messages()}
        for e in dev_examples(lang, n, seed)
    ]
