"""The web app in a real headless Chromium: chat with two LoRAs under LoRA-Flow, watch the reply
stream in and the gate heatmap appear (one row per layer), stop a long reply, compare two methods;
then what a newcomer runs into first: the base model, a preselected saved fusion, Enter while a
reply streams, importing by path after an upload, and MixLoRA from the default pickers.

Screenshots go to artifacts/ (git-ignored) for a look after a run.
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path

import pytest
from app_fixtures import LAYERS, MIXLORA, app_engine, app_url  # noqa: F401  (fixtures)
from helpers import lora_state, write_lora

pytestmark = pytest.mark.filterwarnings("ignore:.*(no_silent_downcasting|copy keyword)")
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
TIMEOUT_MS = 90_000  # generous: the CPU may be shared with other work

if not os.path.exists(CHROMIUM):
    pytest.skip(
        f"{CHROMIUM} is not installed (Debian package 'chromium'); browser tests skipped", allow_module_level=True
    )
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")


SAVED = "es-math-flow"  # the name of the shipped fitted fusion the app preselects for lang-es + task-math
EXAMPLES = "\n".join(
    json.dumps({"prompt": f"¿Cuánto es {a} + {b}?", "response": f"{a} + {b} = {a + b}."}) for a, b in [(3, 4), (10, 5)]
)


@pytest.fixture(scope="module")
def saved_fusion(app_engine):
    """A fitted LoRA-Flow fusion under the shipped name, in the library before the app is built."""
    artifact = app_engine.fit(
        "lora_flow", ["lang-es", "task-math"], EXAMPLES, {}, train={"max_steps": 1, "batch_size": 2}, save_as=SAVED
    )
    yield artifact
    shutil.rmtree(artifact.path, ignore_errors=True)
    app_engine.library.rescan()


@pytest.fixture(scope="module")
def browser(saved_fusion, app_url):
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


def open_page(browser, app_url):
    tab = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    tab.goto(app_url)
    tab.wait_for_selector("#chat-input", timeout=TIMEOUT_MS)
    tab.page_errors = errors
    return tab


@pytest.fixture(scope="module")
def page(browser, app_url):
    tab = open_page(browser, app_url)
    yield tab
    tab.close()


@pytest.fixture()
def fresh(browser, app_url):
    """A page of its own, as a newcomer opens it: the default choices, an empty conversation."""
    tab = open_page(browser, app_url)
    yield tab
    tab.close()


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)


def pick(page, dropdown: str, option: str) -> None:
    """Choose an option of a Gradio dropdown by its visible label."""
    page.click(f"{dropdown} input")
    page.locator(f'[role="option"][aria-label="{option}"]').click()
    page.keyboard.press("Escape")


def set_number(page, slider: str, value: int) -> None:
    """Type a slider's value until the slider itself shows it (the value a click on Send then
    reads): on a slow page a value typed before the component settles can be dropped, so the
    typing is repeated rather than trusted."""
    box = page.locator(f"{slider} input[type=number]")
    shown = page.locator(f"{slider} input[type=range]")
    for _ in range(10):
        box.fill("")
        box.fill(str(value))
        box.press("Enter")
        box.blur()
        try:
            sync_api.expect(shown).to_have_value(str(value), timeout=3_000)
            return
        except AssertionError:
            continue
    sync_api.expect(shown).to_have_value(str(value), timeout=1_000)


def heatmap_rows(page, selector: str):
    return page.evaluate(f"""() => {{
        const plot = document.querySelector('{selector} .js-plotly-plot');
        return plot && plot.data && plot.data.length ? plot.data[0].z.length : null; }}""")


def test_chat_with_lora_flow_streams_and_draws_the_gate_heatmap(page):
    pick(page, "#lang-dd", "lang-ru")
    pick(page, "#task-dd", "task-code")
    pick(page, "#method-dd", "LoRA-Flow (dynamic gates)")
    page.click("text=Generation")
    set_number(page, "#max-tokens", 8)
    # Record every distinct text the last assistant message shows, to see it grow while streaming.
    page.evaluate("""() => {
        window.replySnapshots = new Set();
        new MutationObserver(() => {
            const replies = document.querySelectorAll('#chatbot .bot-row');
            if (replies.length) window.replySnapshots.add(replies[replies.length - 1].innerText.trim());
        }).observe(document.querySelector('#chatbot'), {subtree: true, childList: true, characterData: true});
    }""")
    page.fill("#chat-input textarea", "What is 12 + 7?")
    page.click("#send-btn")
    page.wait_for_function(
        "() => document.querySelector('#chat-status').innerText.includes('new tokens')"
        " && document.querySelector('#trace-info').innerText.includes('layers')",
        timeout=TIMEOUT_MS,
    )
    reply = page.locator("#chatbot .bot-row").last.inner_text().strip()
    assert reply
    snapshots = [s for s in page.evaluate("() => [...window.replySnapshots]") if s]
    assert len(snapshots) >= 2 and snapshots[-1] == reply, snapshots  # it grew token by token
    assert heatmap_rows(page, "#heatmap") == LAYERS
    info = page.inner_text("#trace-info")
    assert "per-token gates" in info and "lang-ru, task-code" in info
    assert page.locator("#token-highlight").inner_text().strip()
    for button in ("#trace-json-btn", "#trace-csv-btn"):  # shown by the same reply's last update
        sync_api.expect(page.locator(button)).to_be_visible(timeout=10_000)
    shot(page, "chat-lora-flow.png")
    assert not page.page_errors


def test_stop_button_ends_a_long_reply(page):
    set_number(page, "#max-tokens", 400)
    page.fill("#chat-input textarea", "Tell me a long story about a lighthouse.")
    page.click("#send-btn")
    page.wait_for_function(
        "() => { const r = document.querySelectorAll('#chatbot .bot-row');"
        " return r.length === 2 && r[1].innerText.trim().length > 0 }",
        timeout=TIMEOUT_MS,
    )
    page.click("#stop-btn")
    page.wait_for_function("() => document.querySelector('#chat-status').innerText.includes('stopped')", timeout=20_000)
    status = page.inner_text("#chat-status")
    new_tokens = int(status.split(" new tokens")[0].split("·")[-1])
    assert new_tokens < 400
    page.wait_for_function(
        "() => { const r = document.querySelectorAll('#chatbot .bot-row');"
        " return r[r.length - 1].innerText.trim().endsWith('[stopped]') }",
        timeout=10_000,
    )
    set_number(page, "#max-tokens", 8)


def test_compare_opens_on_the_fitted_fusion_the_average_and_the_task_lora(page):
    page.click("button[role=tab]:has-text('Compare')")
    page.fill("#compare-input textarea", "What is 2 + 2?")
    set_number(page, "#compare-max-tokens", 6)
    page.click("#compare-btn")
    shown = [0, 1, 2]
    page.wait_for_function(
        f"() => {shown}.every(i => document.querySelector('#compare-stats-' + i).innerText.includes('tok/s'))",
        timeout=TIMEOUT_MS,
    )
    page.wait_for_function(
        "() => [0, 1].every(i => { const p = document.querySelector("
        "'#compare-heatmap-' + i + ' .js-plotly-plot'); return p && p.data && p.data.length })",
        timeout=TIMEOUT_MS,
    )
    stats = [page.inner_text(f"#compare-stats-{i}") for i in shown]
    # The saved fitted gates, then what they must beat: the average of the pair, the task LoRA alone.
    assert stats[0].startswith(f"{SAVED} (lora_flow)"), stats
    assert stats[1].startswith("linear · lang-es + task-math"), stats
    assert stats[2].startswith("single · task-math"), stats
    assert all("first token" in s for s in stats)
    assert all(page.inner_text(f"#compare-out-{i}").strip() for i in shown)
    assert [heatmap_rows(page, f"#compare-heatmap-{i}") for i in (0, 1)] == [LAYERS, LAYERS]
    shot(page, "compare.png")
    assert not page.page_errors


# ---- what a newcomer runs into first ------------------------------------------------------------------
def shows(page, dropdown: str, label: str) -> None:
    """The dropdown shows `label` (waiting for the event that sets it)."""
    sync_api.expect(page.locator(f"{dropdown} input")).to_have_value(label, timeout=20_000)


def wait_for_reply(page) -> None:
    page.wait_for_function(
        "() => document.querySelector('#chat-status').innerText.includes('new tokens')"
        " && !document.querySelector('#send-btn').disabled",
        timeout=TIMEOUT_MS,
    )


def reply_options(page) -> list[str]:
    page.click("#trace-reply-dd input")
    options = page.locator('[role="option"]').all_inner_texts()
    page.keyboard.press("Escape")
    return options


def error_badges(page) -> int:
    return page.locator(".error, .validation-error, [class*='error-badge']").filter(has_text="Error").count()


def test_base_model_reply_keeps_the_page_and_says_there_is_no_adapter(fresh):
    pick(fresh, "#fusion-dd", "(none)")
    pick(fresh, "#method-dd", "Base model")
    fresh.click("text=Generation")
    set_number(fresh, "#max-tokens", 6)
    fresh.fill("#chat-input textarea", "¿Cuánto es 12 + 7?")
    fresh.click("#send-btn")
    wait_for_reply(fresh)
    fresh.wait_for_function(
        "() => document.querySelector('#trace-info').innerText.includes('no adapter')", timeout=20_000
    )
    assert fresh.locator("#chatbot .bot-row").last.inner_text().strip()
    assert "base" in fresh.inner_text("#chat-status")
    assert "no adapter" in fresh.locator("#heatmap").inner_text()
    assert error_badges(fresh) == 0
    assert not fresh.page_errors


def test_picking_a_method_leaves_the_preselected_saved_fusion(fresh):
    assert fresh.input_value("#fusion-dd input").startswith(SAVED)  # preselected on load...
    assert fresh.input_value("#method-dd input").startswith("LoRA-Flow")
    assert fresh.input_value("#chat-param-0-textbox textarea") == SAVED  # its gates
    assert SAVED in fresh.inner_text("#fusion-note")  # ...and said so from the start
    pick(fresh, "#method-dd", "Linear (weighted sum of deltas)")
    shows(fresh, "#fusion-dd", "(none)")
    fresh.click("text=Generation")
    set_number(fresh, "#max-tokens", 4)
    fresh.fill("#chat-input textarea", "Hola")
    fresh.click("#send-btn")
    wait_for_reply(fresh)
    status = fresh.inner_text("#chat-status")
    assert status.startswith("linear") and SAVED not in status and "lora_flow" not in status
    assert "fixed weights" in fresh.inner_text("#trace-info")
    # Picking the fusion again shows its own method and adapters.
    pick(fresh, "#lang-dd", "lang-ru")
    fresh.click("#fusion-dd input")
    fresh.locator('[role="option"]').filter(has_text=SAVED).first.click()
    fresh.keyboard.press("Escape")
    shows(fresh, "#method-dd", "LoRA-Flow (dynamic gates)")
    shows(fresh, "#lang-dd", "lang-es")
    shows(fresh, "#task-dd", "task-math")
    assert not fresh.page_errors


def test_an_example_question_fills_the_box_and_picks_its_fusion(fresh):
    from ui.constants import CHAT_EXAMPLES

    shipped = json.loads(CHAT_EXAMPLES.read_text(encoding="utf-8"))["examples"]
    first = next(e for e in shipped if e["fusion"] == SAVED)  # the only fitted fusion this library has
    buttons = fresh.locator("button[id^=chat-example-]")
    # only the examples whose fusion is in the library: this one has no ru/zh fits
    sync_api.expect(buttons).to_have_count(sum(e["fusion"] == SAVED for e in shipped), timeout=10_000)
    pick(fresh, "#method-dd", "Linear (weighted sum of deltas)")
    shows(fresh, "#fusion-dd", "(none)")
    buttons.first.click()
    sync_api.expect(fresh.locator("#chat-input textarea")).to_have_value(first["question"], timeout=10_000)
    shows(fresh, "#method-dd", "LoRA-Flow (dynamic gates)")
    assert fresh.input_value("#fusion-dd input").startswith(SAVED)
    assert fresh.input_value("#chat-param-0-textbox textarea") == SAVED
    assert fresh.inner_text("#chatbot").count(first["question"]) == 0  # filled, not sent
    assert not fresh.page_errors


def test_enter_while_a_reply_streams_starts_nothing_and_traces_match_the_chat(fresh):
    fresh.click("text=Generation")
    set_number(fresh, "#max-tokens", 60)
    fresh.fill("#chat-input textarea", "Tell me a story about a lighthouse.")
    fresh.click("#send-btn")
    fresh.wait_for_function(
        "() => { const r = document.querySelectorAll('#chatbot .bot-row');"
        " return r.length === 1 && r[0].innerText.trim().length > 0 }",
        timeout=TIMEOUT_MS,
    )
    assert fresh.locator("#send-btn").is_disabled()
    fresh.fill("#chat-input textarea", "And another one.")
    fresh.press("#chat-input textarea", "Enter")
    fresh.click("#send-btn", force=True)
    wait_for_reply(fresh)
    fresh.wait_for_timeout(3000)  # a second reply, if one was started, would have had time to show
    assert fresh.locator("#chatbot .bot-row").count() == 1
    assert fresh.input_value("#chat-input textarea") == "And another one."  # kept for the next turn
    assert len(reply_options(fresh)) == 1
    assert not fresh.page_errors


def test_import_by_path_after_an_upload_imports_the_path(fresh, app_engine, tmp_path):
    zipped, folder = tmp_path / "zipped", tmp_path / "by-path"
    write_lora(zipped, app_engine.model, rank=4, seed=11, state=lora_state(app_engine.model, rank=4, seed=11))
    write_lora(folder, app_engine.model, rank=8, seed=12, state=lora_state(app_engine.model, rank=8, seed=12))
    archive = tmp_path / "zipped.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for f in zipped.iterdir():
            z.write(f, f.name)
    added = ["ui-zip", "ui-path"]
    try:
        fresh.click("button[role=tab]:has-text('Adapters')")
        fresh.set_input_files("#import-zip input[type=file]", str(archive))
        fresh.wait_for_function(
            "() => document.querySelector('#import-zip').innerText.includes('zipped.zip')", timeout=TIMEOUT_MS
        )
        fresh.fill("#import-name textarea", added[0])
        fresh.click("#import-btn")
        fresh.wait_for_function(
            f"() => document.querySelector('#import-status').innerText.includes('{added[0]}')", timeout=TIMEOUT_MS
        )
        assert "rank 4" in fresh.inner_text("#import-status")
        fresh.fill("#import-path textarea", str(folder))
        fresh.fill("#import-name textarea", added[1])
        fresh.click("#import-btn")
        fresh.wait_for_function(
            f"() => document.querySelector('#import-status').innerText.includes('{added[1]}')", timeout=TIMEOUT_MS
        )
        assert "rank 8" in fresh.inner_text("#import-status")  # the typed folder, not the earlier zip
        assert app_engine.library.get_adapter(added[1]).rank == 8
        assert not fresh.page_errors
    finally:
        for name in added:
            shutil.rmtree(app_engine.library.adapters_dir / name, ignore_errors=True)
        app_engine.library.rescan()


def test_mixlora_from_the_default_pickers_answers_with_the_mixlora_adapter(fresh):
    if "mixlora" not in {m["name"] for m in fresh_methods()}:
        pytest.skip("the engine has no mixlora method")
    pick(fresh, "#method-dd", "MixLoRA (LoRA experts)")
    shows(fresh, "#fusion-dd", "(none)")
    shows(fresh, "#lang-dd", "(none)")
    shows(fresh, "#task-dd", "(none)")
    sync_api.expect(fresh.locator("#extra-dd")).to_contain_text(MIXLORA)
    fresh.click("text=Generation")
    set_number(fresh, "#max-tokens", 4)
    fresh.fill("#chat-input textarea", "Hi")
    fresh.click("#send-btn")
    wait_for_reply(fresh)
    assert fresh.inner_text("#chat-status").startswith("mixlora")
    assert "per-token routing" in fresh.inner_text("#trace-info")
    # Back to a LoRA method: the language and task pickers come back, the MixLoRA adapter goes.
    pick(fresh, "#method-dd", "Single LoRA")
    sync_api.expect(fresh.locator("#extra-dd")).not_to_contain_text(MIXLORA, timeout=20_000)
    shows(fresh, "#lang-dd", "(none)")
    shows(fresh, "#task-dd", "task-math")
    assert not fresh.page_errors


def fresh_methods() -> list[dict]:
    from fusion.methods import METHODS

    return [m.describe() for m in METHODS.values()]


# ---- many users, one model: every request joins the engine's one running batch ----------------------
def record_replies(tab) -> None:
    """From now on, note each distinct text of the page's last reply with the time it showed."""
    tab.evaluate("""() => {
        window.replies = [];
        new MutationObserver(() => {
            const rows = document.querySelectorAll('#chatbot .bot-row');
            const text = rows.length ? rows[rows.length - 1].innerText.trim() : '';
            const last = window.replies[window.replies.length - 1];
            if (text && (!last || last.text !== text)) window.replies.push({text, t: Date.now()});
        }).observe(document.querySelector('#chatbot'), {subtree: true, childList: true, characterData: true});
    }""")


def words(text: str) -> str:
    return " ".join(text.split())


def base_chat(tab, tokens: int) -> None:
    pick(tab, "#fusion-dd", "(none)")
    pick(tab, "#method-dd", "Base model")
    tab.click("text=Generation")
    set_number(tab, "#max-tokens", tokens)


def test_two_pages_chatting_at_once_both_stream_their_own_replies(browser, app_url, app_engine):
    """Two browser sessions send at once: each sees its reply grow while the other's is still
    coming, and each reply is the one its request gives alone (greedy)."""
    from fusion.api import FusionRequest, Sampling

    tokens, asks = 24, ["Tell me a story about a lighthouse keeper.", "Describe a walk through a forest."]
    requests = [FusionRequest(fusion=SAVED), FusionRequest()]  # the preselected fusion; the base model
    solo = [app_engine.generate(r, m, Sampling(max_new_tokens=tokens), trace=False) for r, m in zip(requests, asks)]
    assert all(len(e.token_ids) >= 4 for e in solo)
    contexts = [browser.new_context(viewport={"width": 1400, "height": 1000}) for _ in asks]
    try:
        tabs = []
        for context in contexts:
            tab = context.new_page()
            errors = []
            tab.on("pageerror", lambda exc, errors=errors: errors.append(str(exc)))
            tab.goto(app_url)
            tab.wait_for_selector("#chat-input", timeout=TIMEOUT_MS)
            tab.page_errors = errors
            tabs.append(tab)
        base_chat(tabs[1], tokens)
        tabs[0].click("text=Generation")
        set_number(tabs[0], "#max-tokens", tokens)
        for tab, ask in zip(tabs, asks):
            tab.fill("#chat-input textarea", ask)
            record_replies(tab)
        for tab in tabs:
            tab.click("#send-btn")
        for tab in tabs:
            wait_for_reply(tab)
        seen = [tab.evaluate("() => window.replies") for tab in tabs]
        for tab, snapshots, expected in zip(tabs, seen, solo):
            reply = tab.locator("#chatbot .bot-row").last.inner_text().strip()
            assert words(reply).endswith(words(expected.text)), (reply, expected.text)
            assert snapshots[-1]["text"] == reply
            assert not tab.page_errors
        for mine, theirs in ((seen[0], seen[1]), (seen[1], seen[0])):
            finished = next(s["t"] for s in theirs if s["text"] == theirs[-1]["text"])
            growing = [s for s in mine[:-1] if s["t"] < finished]
            assert len(growing) >= 2, (mine, finished)  # two partial replies shown while the other ran
        shot(tabs[1], "two-pages.png")
    finally:
        for context in contexts:
            context.close()


def test_a_chat_waiting_for_room_says_it_is_queued_then_replies(fresh, app_engine, monkeypatch):
    """With the engine's batch full, a message waits: the status says "busy, queued (position 1)"
    (no error), then the reply streams and equals the request's solo run."""
    import threading

    from fusion.api import FusionRequest, Sampling

    scheduler = app_engine.scheduler
    monkeypatch.setattr(scheduler, "max_rows", 1)
    # No stop tokens: the row that fills the batch must not end by itself.
    monkeypatch.setattr(scheduler, "eos", set())
    monkeypatch.setattr(scheduler, "_eos_of", scheduler.tokenizer)
    ask = "What is 12 + 7?"
    expected = app_engine.generate(FusionRequest(), ask, Sampling(max_new_tokens=8), trace=False).text
    base_chat(fresh, 8)
    gate = threading.Event()
    blocker = app_engine.stream(FusionRequest(), "Hi", Sampling(max_new_tokens=1000), cancel=gate, trace=False)
    try:
        next(blocker)  # it holds the only row
        fresh.fill("#chat-input textarea", ask)
        fresh.click("#send-btn")
        fresh.wait_for_function(
            "() => document.querySelector('#chat-status').innerText.includes('busy, queued (position 1)')",
            timeout=TIMEOUT_MS,
        )
        assert fresh.locator("#chatbot .bot-row").count() == 0
        assert error_badges(fresh) == 0
        shot(fresh, "chat-queued.png")
    finally:
        gate.set()
        assert list(blocker)[-1].finish_reason == "cancelled"
    wait_for_reply(fresh)
    reply = fresh.locator("#chatbot .bot-row").last.inner_text().strip()
    assert words(reply).endswith(words(expected)), (reply, expected)
    assert "queued" not in fresh.inner_text("#chat-status")
    assert not fresh.page_errors
