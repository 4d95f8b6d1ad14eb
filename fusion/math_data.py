"""Templated one- and two-step arithmetic word problems (MGSM in spirit, easier).

Two template sets that never share a template:

* ``TRAIN_TEMPLATES`` — English only, used to train the ``task-math`` LoRA;
* ``EVAL_TEMPLATES`` — authored separately in English, Spanish, Russian and Chinese
  (the same problem structure in each language, so scores are comparable across languages).

The operand tuples are disjoint too: every tuple of numbers is assigned to a split by a
deterministic hash (``number_split``); training draws only tuples of the "train" split and
evaluation only tuples of the "eval" split, so no evaluation problem shares its numbers with a
training problem, whatever the seeds.

Every example carries its worked answer in one fixed format, e.g.
``"14 + 9 = 23. 23 - 5 = 18. The answer is 18."``; evaluation reads the final number.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

# ----------------------------------------------------------------------------- operations
# A template names a "program": a list of steps over the slots a, b, c.  Each step is
# (op, left, right) where left/right are slot names or "prev" (the previous step's result).
PROGRAMS = {
    "add": [("+", "a", "b")],
    "sub": [("-", "a", "b")],
    "mul": [("*", "a", "b")],
    "div": [("/", "a", "b")],
    "add_sub": [("+", "a", "b"), ("-", "prev", "c")],
    "sub_add": [("-", "a", "b"), ("+", "prev", "c")],
    "add_add": [("+", "a", "b"), ("+", "prev", "c")],
    "sub_sub": [("-", "a", "b"), ("-", "prev", "c")],
    "mul_add": [("*", "a", "b"), ("+", "prev", "c")],
    "mul_sub": [("*", "a", "b"), ("-", "prev", "c")],
}

_SYMBOL = {"+": "+", "-": "-", "*": "×", "/": "÷"}


def _apply(op: str, x: int, y: int) -> int:
    if op == "+":
        return x + y
    if op == "-":
        return x - y
    if op == "*":
        return x * y
    if op == "/":
        assert x % y == 0
        return x // y
    raise ValueError(op)


def solve(program: str, nums: dict) -> tuple[int, list[str]]:
    """Run a program on the numbers; returns the answer and the worked steps."""
    prev = None
    steps = []
    for op, left, right in PROGRAMS[program]:
        x = prev if left == "prev" else nums[left]
        y = prev if right == "prev" else nums[right]
        r = _apply(op, x, y)
        steps.append(f"{x} {_SYMBOL[op]} {y} = {r}")
        prev = r
    return prev, steps


def worked_answer(program: str, nums: dict) -> str:
    answer, steps = solve(program, nums)
    return ". ".join(steps) + f". The answer is {answer}."


def number_split(program: str, nums: dict) -> str:
    """Deterministic split of operand tuples: about 1 in 4 goes to evaluation."""
    key = program + ":" + ",".join(f"{k}={nums[k]}" for k in sorted(nums))
    h = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)
    return "eval" if h % 4 == 0 else "train"


def sample_numbers(program: str, rng: random.Random) -> dict:
    """Numbers under ~100 with a non-negative, modest answer and exact division."""
    while True:
        if program == "mul":
            nums = {"a": rng.randint(2, 12), "b": rng.randint(2, 9)}
        elif program == "div":
            b = rng.randint(2, 9)
            nums = {"a": b * rng.randint(2, 12), "b": b}
        elif program.startswith("mul_"):
            nums = {"a": rng.randint(2, 9), "b": rng.randint(2, 9), "c": rng.randint(2, 30)}
        else:
            nums = {"a": rng.randint(5, 95), "b": rng.randint(2, 60)}
            if len(PROGRAMS[program]) == 2:
                nums["c"] = rng.randint(2, 40)
        try:
            answer, _ = solve(program, nums)
        except AssertionError:
            continue
        # every intermediate result must stay positive (no "has -3 apples")
        prev, ok = None, True
        for op, left, right in PROGRAMS[program]:
            x = prev if left == "prev" else nums[left]
            y = prev if right == "prev" else nums[right]
            prev = _apply(op, x, y)
            ok = ok and prev > 0
        if ok and answer <= 200:
            return nums


# ----------------------------------------------------------------------------- templates
@dataclass(frozen=True)
class Template:
    id: str
    program: str
    text: dict  # language -> format string with {name}, {a}, {b}, {c}


NAMES = {
    "en": [
        "Liam",
        "Emma",
        "Noah",
        "Olivia",
        "Ava",
        "Lucas",
        "Mia",
        "Ethan",
        "Sofia",
        "Jack",
        "Grace",
        "Leo",
        "Chloe",
        "Ben",
        "Ruby",
        "Sam",
        "Nora",
        "Max",
        "Ella",
        "Tom",
    ],
    "es": [
        "Lucía",
        "Mateo",
        "Martina",
        "Hugo",
        "Valeria",
        "Pablo",
        "Carmen",
        "Diego",
        "Elena",
        "Javier",
        "Paula",
        "Andrés",
        "Sara",
        "Miguel",
        "Laura",
        "Tomás",
    ],
    # Russian names carry their genitive form and gender (verbs agree in the past tense).
    "ru": [
        ("Аня", "Ани", "f"),
        ("Иван", "Ивана", "m"),
        ("Маша", "Маши", "f"),
        ("Олег", "Олега", "m"),
        ("Катя", "Кати", "f"),
        ("Дима", "Димы", "m"),
        ("Лена", "Лены", "f"),
        ("Петя", "Пети", "m"),
        ("Оля", "Оли", "f"),
        ("Миша", "Миши", "m"),
        ("Нина", "Нины", "f"),
        ("Костя", "Кости", "m"),
        ("Таня", "Тани", "f"),
        ("Гоша", "Гоши", "m"),
        ("Вера", "Веры", "f"),
    ],
    "zh": [
        "小明",
        "小红",
        "李华",
        "王芳",
        "张伟",
        "刘洋",
        "陈静",
        "赵磊",
        "小丽",
        "小刚",
        "周敏",
        "孙强",
        "林琳",
        "吴昊",
    ],
}

# English training templates: everyday scenarios, one or two steps.
_TRAIN = [
    ("t-pencils", "add", "{name} has {a} pencils and buys {b} more. How many pencils does {name} have now?"),
    (
        "t-stickers",
        "add",
        "A sticker book holds {a} stickers on the first page and {b} on the second. How many stickers are on both pages?",
    ),
    (
        "t-birds",
        "add",
        "There are {a} birds on a tree. Then {b} more birds land on it. How many birds are on the tree?",
    ),
    (
        "t-steps",
        "add",
        "{name} walked {a} steps before lunch and {b} steps after lunch. How many steps did {name} walk in total?",
    ),
    (
        "t-shells",
        "add",
        "{name} found {a} shells on Monday and {b} shells on Tuesday. How many shells did {name} find?",
    ),
    ("t-cookies", "sub", "{name} baked {a} cookies and gave away {b}. How many cookies are left?"),
    (
        "t-balloons",
        "sub",
        "A party shop had {a} balloons. It sold {b} of them. How many balloons does the shop have left?",
    ),
    ("t-pages", "sub", "A book has {a} pages. {name} has read {b} pages. How many pages are left to read?"),
    (
        "t-bus",
        "sub",
        "A bus has {a} passengers. At the next stop {b} passengers get off. How many passengers are still on the bus?",
    ),
    (
        "t-money",
        "sub",
        "{name} had {a} dollars and spent {b} dollars on a gift. How many dollars does {name} have left?",
    ),
    ("t-boxes", "mul", "There are {a} boxes with {b} oranges in each box. How many oranges are there?"),
    ("t-rows", "mul", "A garden has {a} rows with {b} flowers in each row. How many flowers are in the garden?"),
    ("t-packs", "mul", "{name} buys {a} packs of cards. Each pack has {b} cards. How many cards does {name} buy?"),
    ("t-share", "div", "{name} shares {a} candies equally among {b} friends. How many candies does each friend get?"),
    ("t-teams", "div", "A coach splits {a} players into {b} equal teams. How many players are on each team?"),
    (
        "t-marbles",
        "add_sub",
        "{name} has {a} marbles, wins {b} more in a game, then loses {c}. How many marbles does {name} have now?",
    ),
    (
        "t-library",
        "add_sub",
        "A library has {a} books. It receives {b} new books and lends out {c}. How many books are on the shelves?",
    ),
    (
        "t-fish",
        "sub_add",
        "A tank has {a} fish. {name} gives away {b} fish and then buys {c} new ones. How many fish are in the tank?",
    ),
    (
        "t-train",
        "sub_add",
        "A train has {a} people. At a station {b} people get off and {c} people get on. How many people are on the train?",
    ),
    (
        "t-points",
        "add_add",
        "{name} scored {a} points in the first game, {b} in the second and {c} in the third. How many points did {name} score in all?",
    ),
    (
        "t-apples",
        "sub_sub",
        "{name} picked {a} apples. {name} ate {b} and gave {c} to a neighbour. How many apples are left?",
    ),
    (
        "t-eggs",
        "mul_add",
        "A farmer fills {a} cartons with {b} eggs each and has {c} eggs left over. How many eggs does the farmer have?",
    ),
    ("t-chairs", "mul_sub", "A hall has {a} rows of {b} chairs. {c} chairs are taken. How many chairs are free?"),
    ("t-stamps", "add", "{name} had {a} stamps. A friend gave {name} {b} stamps. How many stamps does {name} have?"),
]

TRAIN_TEMPLATES = [Template(tid, prog, {"en": text}) for tid, prog, text in _TRAIN]

# Evaluation templates: different scenarios and wording from training, parallel in four languages.
# Russian texts use two small extensions: {a|one|few|many} picks the noun form that agrees with
# the number a, and {g:masc|fem} picks the verb form that agrees with the name.


def ru_plural(n: int, one: str, few: str, many: str) -> str:
    n = abs(n)
    if n % 10 == 1 and n % 100 != 11:
        return one
    if 2 <= n % 10 <= 4 and not 12 <= n % 100 <= 14:
        return few
    return many


EVAL_TEMPLATES = [
    Template(
        "e-toycars",
        "add",
        {
            "en": "{name} owns {a} toy cars. For a birthday {name} gets {b} more toy cars. How many toy cars does {name} own now?",
            "es": "{name} tiene {a} coches de juguete. En su cumpleaños recibe {b} coches de juguete más. ¿Cuántos coches de juguete tiene {name} ahora?",
            "ru": "У {name_gen} было {a} {a|игрушечная машинка|игрушечные машинки|игрушечных машинок}. На день рождения {name} {g:получил|получила} ещё {b} {b|машинку|машинки|машинок}. Сколько игрушечных машинок теперь у {name_gen}?",
            "zh": "{name}有{a}辆玩具车。生日时{name}又得到了{b}辆玩具车。{name}现在一共有多少辆玩具车？",
        },
    ),
    Template(
        "e-muffins",
        "sub",
        {
            "en": "A bakery made {a} muffins in the morning and sold {b} by noon. How many muffins were not sold by noon?",
            "es": "Una panadería hizo {a} magdalenas por la mañana y vendió {b} antes del mediodía. ¿Cuántas magdalenas quedaron sin vender al mediodía?",
            "ru": "Утром пекарня испекла {a} {a|кекс|кекса|кексов} и до полудня продала {b} {b|кекс|кекса|кексов}. Сколько кексов осталось непроданными к полудню?",
            "zh": "面包店早上做了{a}个松饼，到中午卖出了{b}个。到中午还有多少个松饼没有卖出？",
        },
    ),
    Template(
        "e-crates",
        "mul",
        {
            "en": "A shop receives {a} crates of lemons. Every crate holds {b} lemons. How many lemons does the shop receive?",
            "es": "Una tienda recibe {a} cajas de limones. Cada caja contiene {b} limones. ¿Cuántos limones recibe la tienda?",
            "ru": "В магазин привезли {a} {a|ящик|ящика|ящиков} лимонов. В каждом ящике {b} {b|лимон|лимона|лимонов}. Сколько всего лимонов привезли в магазин?",
            "zh": "一家商店收到{a}箱柠檬，每箱有{b}个柠檬。这家商店一共收到多少个柠檬？",
        },
    ),
    Template(
        "e-bags",
        "div",
        {
            "en": "{name} puts {a} tennis balls into bags, {b} balls in every bag. How many bags does {name} fill?",
            "es": "{name} mete {a} pelotas de tenis en bolsas, {b} pelotas en cada bolsa. ¿Cuántas bolsas llena {name}?",
            "ru": "{name} раскладывает {a} {a|теннисный мяч|теннисных мяча|теннисных мячей} по пакетам, по {b} {b|мяч|мяча|мячей} в каждый пакет. Сколько пакетов заполнит {name}?",
            "zh": "{name}把{a}个网球装进袋子里，每个袋子装{b}个。{name}能装满多少个袋子？",
        },
    ),
    Template(
        "e-parking",
        "sub_add",
        {
            "en": "A parking lot has {a} cars. Then {b} cars drive away and {c} cars arrive. How many cars are in the parking lot now?",
            "es": "En un aparcamiento hay {a} coches. Luego se van {b} coches y llegan {c} coches. ¿Cuántos coches hay ahora en el aparcamiento?",
            "ru": "На парковке стоит {a} {a|автомобиль|автомобиля|автомобилей}. Потом уезжает {b} {b|автомобиль|автомобиля|автомобилей} и приезжает {c} {c|автомобиль|автомобиля|автомобилей}. Сколько автомобилей теперь на парковке?",
            "zh": "停车场里有{a}辆汽车。后来开走了{b}辆，又开来了{c}辆。现在停车场里有多少辆汽车？",
        },
    ),
    Template(
        "e-savings",
        "add_sub",
        {
            "en": "{name} saved {a} euros, earned {b} euros more by helping a neighbour, and then paid {c} euros for a ticket. How many euros does {name} have now?",
            "es": "{name} ahorró {a} euros, ganó {b} euros más ayudando a un vecino y luego pagó {c} euros por una entrada. ¿Cuántos euros tiene {name} ahora?",
            "ru": "{name} {g:накопил|накопила} {a} евро, {g:заработал|заработала} ещё {b} евро, помогая соседу, а потом {g:заплатил|заплатила} {c} евро за билет. Сколько евро теперь у {name_gen}?",
            "zh": "{name}存了{a}欧元，帮邻居干活又挣了{b}欧元，然后花{c}欧元买了一张票。{name}现在有多少欧元？",
        },
    ),
    Template(
        "e-tickets",
        "mul_sub",
        {
            "en": "A theatre has {a} rows with {b} seats in each row. {c} tickets have been sold. How many seats are still available?",
            "es": "Un teatro tiene {a} filas con {b} asientos en cada fila. Se han vendido {c} entradas. ¿Cuántos asientos quedan libres?",
            "ru": "В театре {a} {a|ряд|ряда|рядов}, в каждом ряду {b} {b|место|места|мест}. Продано {c} {c|билет|билета|билетов}. Сколько мест ещё свободно?",
            "zh": "一个剧院有{a}排座位，每排有{b}个座位。已经卖出了{c}张票。还有多少个空座位？",
        },
    ),
    Template(
        "e-laps",
        "add_add",
        {
            "en": "{name} swam {a} laps on Friday, {b} laps on Saturday and {c} laps on Sunday. How many laps did {name} swim on these three days?",
            "es": "{name} nadó {a} largos el viernes, {b} largos el sábado y {c} largos el domingo. ¿Cuántos largos nadó {name} en esos tres días?",
            "ru": "{name} {g:проплыл|проплыла} {a} {a|круг|круга|кругов} в пятницу, {b} {b|круг|круга|кругов} в субботу и {c} {c|круг|круга|кругов} в воскресенье. Сколько кругов {g:проплыл|проплыла} {name} за эти три дня?",
            "zh": "{name}星期五游了{a}圈，星期六游了{b}圈，星期日游了{c}圈。{name}这三天一共游了多少圈？",
        },
    ),
]
# A second set of evaluation templates, written later in the same way, so that an evaluation of
# a few hundred problems per language spreads over sixteen wordings instead of eight.
EVAL_TEMPLATES += [
    Template(
        "e-tulips",
        "add",
        {
            "en": "{name} planted {a} tulip bulbs in spring and {b} more in autumn. How many tulip bulbs did {name} plant?",
            "es": "{name} plantó {a} bulbos de tulipán en primavera y {b} más en otoño. ¿Cuántos bulbos de tulipán plantó {name}?",
            "ru": "{name} {g:посадил|посадила} весной {a} {a|луковицу|луковицы|луковиц} тюльпанов, а осенью ещё {b}. Сколько луковиц тюльпанов {g:посадил|посадила} {name}?",
            "zh": "{name}春天种了{a}个郁金香球茎，秋天又种了{b}个。{name}一共种了多少个郁金香球茎？",
        },
    ),
    Template(
        "e-puzzle",
        "sub",
        {
            "en": "A puzzle has {a} pieces. {name} has already placed {b} pieces. How many pieces are still missing?",
            "es": "Un rompecabezas tiene {a} piezas. {name} ya ha colocado {b} piezas. ¿Cuántas piezas faltan todavía?",
            "ru": "В пазле {a} {a|деталь|детали|деталей}. {name} уже {g:собрал|собрала} {b} {b|деталь|детали|деталей}. Сколько деталей ещё осталось?",
            "zh": "一幅拼图有{a}块。{name}已经拼好了{b}块。还剩多少块没有拼？",
        },
    ),
    Template(
        "e-shelves",
        "mul",
        {
            "en": "A bookcase has {a} shelves, and {b} books stand on each shelf. How many books are in the bookcase?",
            "es": "Una estantería tiene {a} baldas y en cada balda hay {b} libros. ¿Cuántos libros hay en la estantería?",
            "ru": "В шкафу {a} {a|полка|полки|полок}, на каждой полке стоит по {b} {b|книге|книги|книг}. Сколько всего книг в шкафу?",
            "zh": "一个书柜有{a}层，每层放着{b}本书。书柜里一共有多少本书？",
        },
    ),
    Template(
        "e-groups",
        "div",
        {
            "en": "A guide splits {a} tourists into groups of {b}. How many groups are there?",
            "es": "Un guía divide a {a} turistas en grupos de {b}. ¿Cuántos grupos hay?",
            "ru": "У экскурсовода {a} {a|турист|туриста|туристов}. Он делит их на группы по {b} {b|человеку|человека|человек}. Сколько получится групп?",
            "zh": "导游把{a}名游客分成每组{b}人的小组。一共能分成多少组？",
        },
    ),
    Template(
        "e-roses",
        "add_sub",
        {
            "en": "A florist had {a} roses, got a delivery of {b} roses, and then sold {c}. How many roses does the florist have now?",
            "es": "Una florista tenía {a} rosas, recibió {b} rosas más y luego vendió {c}. ¿Cuántas rosas tiene ahora?",
            "ru": "У цветочницы было {a} {a|роза|розы|роз}. Ей привезли ещё {b} {b|розу|розы|роз}, а потом она продала {c}. Сколько роз теперь у цветочницы?",
            "zh": "花店原来有{a}枝玫瑰，又运来了{b}枝，然后卖出了{c}枝。花店现在有多少枝玫瑰？",
        },
    ),
    Template(
        "e-juice",
        "sub_sub",
        {
            "en": "A cafe had {a} bottles of juice. In the morning {b} bottles were drunk and in the evening {c} more. How many bottles are left?",
            "es": "Una cafetería tenía {a} botellas de zumo. Por la mañana se bebieron {b} botellas y por la noche {c} más. ¿Cuántas botellas quedan?",
            "ru": "В кафе было {a} {a|бутылка|бутылки|бутылок} сока. Утром выпили {b} {b|бутылку|бутылки|бутылок}, а вечером ещё {c}. Сколько бутылок осталось?",
            "zh": "咖啡馆有{a}瓶果汁。上午喝掉了{b}瓶，晚上又喝掉了{c}瓶。还剩多少瓶果汁？",
        },
    ),
    Template(
        "e-batteries",
        "mul_add",
        {
            "en": "{name} buys {a} packs of {b} batteries and finds {c} more batteries in a drawer. How many batteries does {name} have?",
            "es": "{name} compra {a} paquetes de {b} pilas y encuentra {c} pilas más en un cajón. ¿Cuántas pilas tiene {name}?",
            "ru": "{name} {g:купил|купила} {a} {a|упаковку|упаковки|упаковок} по {b} {b|батарейке|батарейки|батареек} и {g:нашёл|нашла} в ящике ещё {c} {c|батарейку|батарейки|батареек}. Сколько батареек у {name_gen}?",
            "zh": "{name}买了{a}包电池，每包{b}节，又在抽屉里找到了{c}节电池。{name}一共有多少节电池？",
        },
    ),
    Template(
        "e-classroom",
        "sub_add",
        {
            "en": "A classroom has {a} pupils. {b} pupils go home early and {c} pupils from another class join. How many pupils are in the classroom now?",
            "es": "En un aula hay {a} alumnos. {b} alumnos se van a casa antes y llegan {c} alumnos de otra clase. ¿Cuántos alumnos hay ahora en el aula?",
            "ru": "В классе {a} {a|ученик|ученика|учеников}. {b} {b|ученик ушёл|ученика ушли|учеников ушли} домой раньше, а {c} {c|ученик пришёл|ученика пришли|учеников пришли} из другого класса. Сколько учеников теперь в классе?",
            "zh": "教室里有{a}名学生。{b}名学生提前回家了，又从别的班来了{c}名学生。教室里现在有多少名学生？",
        },
    ),
]
EVAL_LANGUAGES = ("en", "es", "ru", "zh")

# Dev templates: for choosing a fit's learning rate, batch size and checkpoint (LoRA-Flow's
# paper does that on a dev split). Target languages only, scenarios shared with no training,
# fitting or evaluation template; numbers from the "train" side of the hash split.
DEV_LANGUAGES = ("es", "ru", "zh")
DEV_TEMPLATES = [
    Template(
        "d-buttons",
        "add",
        {
            "es": "{name} tiene {a} botones en un frasco y encuentra {b} más. ¿Cuántos botones hay en el frasco?",
            "ru": "У {name_gen} в банке {a} {a|пуговица|пуговицы|пуговиц}, и {name} {g:нашёл|нашла} ещё {b}. Сколько пуговиц теперь в банке?",
            "zh": "{name}的罐子里有{a}颗纽扣，又找到了{b}颗。罐子里现在有多少颗纽扣？",
        },
    ),
    Template(
        "d-candles",
        "sub",
        {
            "es": "Una tienda tenía {a} velas y vendió {b}. ¿Cuántas velas le quedan a la tienda?",
            "ru": "В лавке было {a} {a|свеча|свечи|свечей}, из них продали {b}. Сколько свечей осталось в лавке?",
            "zh": "一家小店有{a}支蜡烛，卖出了{b}支。小店还剩多少支蜡烛？",
        },
    ),
    Template(
        "d-tiles",
        "mul",
        {
            "es": "Una pared tiene {a} filas de azulejos con {b} azulejos en cada fila. ¿Cuántos azulejos hay en la pared?",
            "ru": "На стене {a} {a|ряд|ряда|рядов} плитки, в каждом ряду {b} {b|плитка|плитки|плиток}. Сколько всего плиток на стене?",
            "zh": "一面墙上贴了{a}排瓷砖，每排{b}块。墙上一共有多少块瓷砖？",
        },
    ),
    Template(
        "d-trees",
        "div",
        {
            "es": "Un jardinero planta {a} árboles en {b} filas iguales. ¿Cuántos árboles hay en cada fila?",
            "ru": "Садовник сажает {a} {a|дерево|дерева|деревьев} поровну в {b} {b|ряд|ряда|рядов}. Сколько деревьев в каждом ряду?",
            "zh": "园丁把{a}棵树平均种成{b}排。每排种多少棵树？",
        },
    ),
    Template(
        "d-bikes",
        "sub_add",
        {
            "es": "Un alquiler de bicicletas tiene {a} bicicletas. Se alquilan {b} y se devuelven {c}. ¿Cuántas bicicletas hay ahora en el alquiler?",
            "ru": "В прокате {a} {a|велосипед|велосипеда|велосипедов}. {b} {b|велосипед взяли|велосипеда взяли|велосипедов взяли} напрокат, а {c} {c|велосипед вернули|велосипеда вернули|велосипедов вернули}. Сколько велосипедов теперь в прокате?",
            "zh": "租车点有{a}辆自行车。租出去了{b}辆，又还回来{c}辆。租车点现在有多少辆自行车？",
        },
    ),
    Template(
        "d-photos",
        "add_add",
        {
            "es": "{name} hizo {a} fotos el lunes, {b} el martes y {c} el miércoles. ¿Cuántas fotos hizo {name} en total?",
            "ru": "{name} {g:сделал|сделала} {a} {a|фотографию|фотографии|фотографий} в понедельник, {b} во вторник и {c} в среду. Сколько всего фотографий {g:сделал|сделала} {name}?",
            "zh": "{name}星期一拍了{a}张照片，星期二拍了{b}张，星期三拍了{c}张。{name}一共拍了多少张照片？",
        },
    ),
]


@dataclass(frozen=True)
class MathExample:
    template: str
    language: str
    program: str
    numbers: tuple  # sorted (slot, value) pairs
    question: str
    answer: str  # worked answer text
    value: int  # the final number

    def messages(self) -> list[dict]:
        return [{"role": "user", "content": self.question}, {"role": "assistant", "content": self.answer}]


_PLURAL = re.compile(r"\{([abc])\|([^|{}]+)\|([^|{}]+)\|([^|{}]+)\}")
_GENDER = re.compile(r"\{g:([^|{}]+)\|([^|{}]+)\}")


def _render(t: Template, lang: str, nums: dict, rng: random.Random) -> str:
    text = t.text[lang]
    if lang == "ru":
        name, name_gen, gender = rng.choice(NAMES["ru"])
        text = _PLURAL.sub(lambda m: ru_plural(nums[m.group(1)], *m.group(2, 3, 4)), text)
        text = _GENDER.sub(lambda m: m.group(1) if gender == "m" else m.group(2), text)
        return text.format(name=name, name_gen=name_gen, **nums)
    return text.format(name=rng.choice(NAMES[lang]), **nums)


def _generate(templates, lang: str, n: int, seed: int, split: str) -> list[MathExample]:
    rng = random.Random(f"{split}:{lang}:{seed}")
    out, seen = [], set()
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 200 * n + 1000:
            raise RuntimeError(f"cannot draw {n} distinct {split} problems")
        t = templates[len(out) % len(templates)] if split in ("eval", "dev") else rng.choice(templates)
        nums = sample_numbers(t.program, rng)
        if number_split(t.program, nums) != ("train" if split == "dev" else split):
            continue
        key = (t.id, tuple(sorted(nums.items())))
        if key in seen:
            continue
        seen.add(key)
        value, _ = solve(t.program, nums)
        out.append(
            MathExample(
                template=t.id,
                language=lang,
                program=t.program,
                numbers=tuple(sorted(nums.items())),
                question=_render(t, lang, nums, rng),
                answer=worked_answer(t.program, nums),
                value=value,
            )
        )
    return out


def train_examples(n: int = 2000, seed: int = 0) -> list[MathExample]:
    """English training problems (train templates, train-split numbers)."""
    return _generate(TRAIN_TEMPLATES, "en", n, seed, "train")


def eval_examples(lang: str = "en", n: int = 48, seed: int = 0) -> list[MathExample]:
    """Evaluation problems in one language (eval templates, eval-split numbers).

    With the same seed, every language gets the same templates and numbers in the same order,
    so per-language scores are directly comparable.
    """
    if lang not in EVAL_LANGUAGES:
        raise ValueError(f"no evaluation templates for language {lang!r}")
    exs = _generate(EVAL_TEMPLATES, "en", n, seed, "eval")
    if lang == "en":
        return exs
    rng = random.Random(f"names:{lang}:{seed}")
    by_id = {t.id: t for t in EVAL_TEMPLATES}
    return [
        MathExample(
            template=e.template,
            language=lang,
            program=e.program,
            numbers=e.numbers,
            question=_render(by_id[e.template], lang, dict(e.numbers), rng),
            answer=e.answer,
            value=e.value,
        )
        for e in exs
    ]


def dev_examples(lang: str, n: int = 60, seed: int = 0) -> list[MathExample]:
    """Dev problems in a target language (dev templates, train-split numbers); the answers are in
    English form here; math_fit_data.dev_records localizes them like the fitting data."""
    if lang not in DEV_LANGUAGES:
        raise ValueError(f"no dev templates for language {lang!r}; choose from {DEV_LANGUAGES}")
    return _generate(DEV_TEMPLATES, lang, n, seed, "dev")
