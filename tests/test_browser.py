"""The web app in a real headless Chromium: chat with two LoRAs under LoRA-Flow, watch the reply
stream in and the gate heatmap appear (one row per layer), stop a long reply, compare two methods.

Screenshots go to artifacts/ (git-ignored) for a look after a run.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from app_fixtures import LAYERS, app_engine, app_url  # noqa: F401  (fixtures)

pytestmark = pytest.mark.filterwarnings("ignore:.*(no_silent_downcasting|copy keyword)")
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
TIMEOUT_MS = 90_000  # generous: the CPU may be shared with other work

if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} is not installed (Debian package 'chromium'); browser tests skipped",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")


@pytest.fixture(scope="module")
def page(app_url):
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            tab = browser.new_page(viewport={"width": 1400, "height": 1000})
            errors: list[str] = []
            tab.on("pageerror", lambda exc: errors.append(str(exc)))
            tab.goto(app_url)
            tab.wait_for_selector("#chat-input", timeout=TIMEOUT_MS)
            tab.page_errors = errors
            yield tab
        finally:
            browser.close()


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)


def pick(page, dropdown: str, option: str) -> None:
    """Choose an option of a Gradio dropdown by its visible label."""
    page.click(f"{dropdown} input")
    page.locator(f'[role="option"][aria-label="{option}"]').click()
    page.keyboard.press("Escape")


def set_number(page, slider: str, value: int) -> None:
    box = page.locator(f"{slider} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


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
    page.wait_for_function("() => document.querySelector('#chat-status').innerText.includes('new tokens')"
                           " && document.querySelector('#trace-info').innerText.includes('layers')",
                           timeout=TIMEOUT_MS)
    reply = page.locator("#chatbot .bot-row").last.inner_text().strip()
    assert reply
    snapshots = [s for s in page.evaluate("() => [...window.replySnapshots]") if s]
    assert len(snapshots) >= 2 and snapshots[-1] == reply, snapshots  # it grew token by token
    assert heatmap_rows(page, "#heatmap") == LAYERS
    info = page.inner_text("#trace-info")
    assert "per-token gates" in info and "lang-ru, task-code" in info
    assert page.locator("#token-highlight").inner_text().strip()
    assert page.locator("#trace-json-btn").is_visible() and page.locator("#trace-csv-btn").is_visible()
    shot(page, "chat-lora-flow.png")
    assert not page.page_errors


def test_stop_button_ends_a_long_reply(page):
    set_number(page, "#max-tokens", 400)
    page.fill("#chat-input textarea", "Tell me a long story about a lighthouse.")
    page.click("#send-btn")
    page.wait_for_function("() => { const r = document.querySelectorAll('#chatbot .bot-row');"
                           " return r.length === 2 && r[1].innerText.trim().length > 0 }", timeout=TIMEOUT_MS)
    page.click("#stop-btn")
    page.wait_for_function("() => document.querySelector('#chat-status').innerText.includes('stopped')",
                           timeout=20_000)
    status = page.inner_text("#chat-status")
    new_tokens = int(status.split(" new tokens")[0].split("·")[-1])
    assert new_tokens < 400
    page.wait_for_function("() => { const r = document.querySelectorAll('#chatbot .bot-row');"
                           " return r[r.length - 1].innerText.trim().endsWith('[stopped]') }", timeout=10_000)
    set_number(page, "#max-tokens", 8)


def test_compare_two_methods_side_by_side(page):
    page.click("button[role=tab]:has-text('Compare')")
    page.fill("#compare-input textarea", "What is 2 + 2?")
    set_number(page, "#compare-max-tokens", 6)
    page.click("#compare-btn")
    page.wait_for_function("() => [0, 1].every(i => document.querySelector('#compare-stats-' + i)"
                           ".innerText.includes('tok/s'))", timeout=TIMEOUT_MS)
    page.wait_for_function("() => [0, 1].every(i => { const p = document.querySelector("
                           "'#compare-heatmap-' + i + ' .js-plotly-plot'); return p && p.data && p.data.length })",
                           timeout=TIMEOUT_MS)
    stats = [page.inner_text(f"#compare-stats-{i}") for i in (0, 1)]
    assert stats[0].startswith("lora_flow") and stats[1].startswith("linear")
    assert all("first token" in s for s in stats)
    assert all(page.inner_text(f"#compare-out-{i}").strip() for i in (0, 1))
    assert [heatmap_rows(page, f"#compare-heatmap-{i}") for i in (0, 1)] == [LAYERS, LAYERS]
    shot(page, "compare.png")
    assert not page.page_errors
