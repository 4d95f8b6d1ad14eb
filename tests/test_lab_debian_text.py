"""The language data built from Debian's packages, on a small fixture file tree."""

import re

import pytest

from fusion.errors import FusionError
from lab import debian_text as dt

EN_PAGE = """<html><body><h2>2.1. Before you start</h2>
<p>Read this chapter before you install the system on your computer.</p>
<pre>apt-get install foo</pre>
<p>The installer asks a few questions and then copies the files to the disk.</p>
<p>You need 512 megabytes of memory.</p>
<h3>2.2. Choosing a mirror</h3>
<p>Choose a mirror that is close to you, so the download is fast and reliable.</p>
</body></html>"""
ES_PAGE = """<html><body><h2>2.1. Antes de empezar</h2>
<p>Lea este capítulo antes de instalar el sistema en su ordenador.</p>
<pre>apt-get install foo</pre>
<p>El instalador hace algunas preguntas y luego copia los archivos al disco. Después reinicia el equipo.</p>
<p>Necesita 512 megabytes de memoria.</p>
<h3>2.2. Elegir una réplica</h3>
<p>Choose a mirror that is close to you, so the download is fast and reliable.</p>
</body></html>"""
SHORT_PAGE = "<html><body><p>Solo un párrafo en este archivo de prueba para nada.</p></body></html>"
FORTUNES = """La amistad es un alma que habita en dos cuerpos. Un corazón que habita en dos almas.
		-- Aristóteles.
%
El 90 por ciento de todo es basura.
%
Donde hay concordia siempre hay victoria, y donde hay victoria hay paz duradera.
		-- Publio Siro.
"""


@pytest.fixture()
def root(tmp_path):
    guide = tmp_path / dt.GUIDE
    (guide / "en").mkdir(parents=True)
    (guide / "es").mkdir(parents=True)
    (guide / "en" / "ch02.html").write_text(EN_PAGE, encoding="utf-8")
    (guide / "es" / "ch02.html").write_text(ES_PAGE, encoding="utf-8")
    (guide / "en" / "ch03.html").write_text(EN_PAGE, encoding="utf-8")  # paragraph counts differ: skipped
    (guide / "es" / "ch03.html").write_text(SHORT_PAGE, encoding="utf-8")
    ref = tmp_path / dt.REFERENCE
    ref.mkdir(parents=True)
    (ref / "ch01.en.html").write_text(EN_PAGE, encoding="utf-8")
    (ref / "ch01.es.html").write_text(ES_PAGE, encoding="utf-8")
    fortunes = tmp_path / dt.FORTUNES / "es"
    fortunes.mkdir(parents=True)
    (fortunes / "amistad.fortunes.u8").write_text(FORTUNES, encoding="utf-8")
    return tmp_path


def test_parallel_paragraphs_keep_translated_prose_only(root):
    pairs = dt.parallel_paragraphs("es", root)
    # per aligned page: paragraph 1 and 2 pass; the one with digits and the untranslated one do not
    assert [(en.text[:10], es.text[:10]) for en, es in pairs] == [
        ("Read this ", "Lea este c"),
        ("The instal", "El instala"),
    ] * 2
    assert pairs[0][1].title == "Antes de empezar" and pairs[0][0].title == "Before you start"
    assert {es.source for _, es in pairs} == {"installation-guide/ch02.html", "debian-reference/ch01.es.html"}


def test_fortunes_drop_attribution_and_digits(root):
    sayings = dt.fortunes("es", root)
    assert sayings == [
        ("La amistad es un alma que habita en dos cuerpos. Un corazón que habita en dos almas.", "amistad"),
        ("Donde hay concordia siempre hay victoria, y donde hay victoria hay paz duradera.", "amistad"),
    ]


def test_examples_of_every_kind_in_the_language(root):
    records = dt.build_examples("es", seed=0, root=root)
    kinds = {r["kind"] for r in records}
    assert kinds == {"to_lang", "to_en", "continue", "title", "topic"}
    for r in records:
        user, answer = r["messages"][0]["content"], r["messages"][1]["content"]
        assert r["messages"][0]["role"] == "user" and r["messages"][1]["role"] == "assistant"
        assert not re.search(r"\d", user + answer)
        if r["kind"] == "topic":
            assert any(user == a.format(t="la amistad") for a in dt.ES_TOPIC_ASK), user
        else:  # a Spanish instruction, then the passage
            assert user.split("\n\n")[0] in dt.INSTRUCTIONS[r["kind"]]["es"], user
        if r["kind"] == "to_en":
            assert dt.in_language(answer, "en"), answer
        else:
            assert dt.in_language(answer, "es"), answer
    cont = next(r for r in records if r["kind"] == "continue" and r["source"].startswith("installation"))
    assert cont["messages"][0]["content"].endswith("copia los archivos al disco.")
    assert cont["messages"][1]["content"] == "Después reinicia el equipo."
    topic = next(r for r in records if r["kind"] == "topic")
    assert "la amistad" in topic["messages"][0]["content"]
    assert dt.build_examples("es", seed=0, root=root) == records  # seeded
    assert dt.build_examples("es", seed=1, root=root) != records


def test_split_in_two():
    assert dt.split_in_two("Primera frase bastante larga. Segunda frase también larga.", "es") == (
        "Primera frase bastante larga.",
        "Segunda frase también larga.",
    )
    assert dt.split_in_two("Una sola frase sin corte posible", "es") is None
    assert dt.split_in_two("第一句话写得比较长一些。第二句话也写得比较长。", "zh") == (
        "第一句话写得比较长一些。",
        "第二句话也写得比较长。",
    )


def test_missing_package_is_named_in_one_line(root):
    (root / dt.FORTUNES / "es" / "amistad.fortunes.u8").unlink()
    (root / dt.FORTUNES / "es").rmdir()
    with pytest.raises(FusionError) as info:
        dt.build_examples("es", root=root)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("Debian package fortunes-es is not installed")
    assert message.endswith("install it with: apt-get install fortunes-es")
    with pytest.raises(FusionError, match="no Debian language data for 'fr'"):
        dt.require("fr", root)


def test_lab_command_exits_with_the_message(monkeypatch, capsys):
    from lab import __main__ as lab

    monkeypatch.setitem(dt.MARKERS, "installation-guide-amd64", "no/such/dir")
    monkeypatch.setattr(lab, "_lang_examples", lambda lang: lambda seed: dt.build_examples(lang, seed))
    with pytest.raises(SystemExit) as info:
        lab.main(["data", "-n", "1"])
    assert str(info.value).startswith("error: Debian package installation-guide-amd64 is not installed")
