"""Chat tab: pick LoRAs and a fusion method, talk to the fused model, see why it answered so."""

from __future__ import annotations

import gradio as gr

from fusion.api import Sampling

from .choices import (
    adapter_choices,
    adapters_for,
    build_request,
    chat_examples,
    check_choice,
    default_selection,
    describe_fusion,
    example_label,
    fusion_choices,
    method_choices,
    request_label,
    saved_fusion,
)
from .common import TOAST_SECONDS, ParamPanel, Studio, error_line, log, queued_note
from .constants import APP, NONE
from .trace_panel import TracePanel

STOPPED = " [stopped]"  # shown after a reply cut short; never sent back to the model


def new_session() -> dict:
    """history: what the model is sent; shown: the same turns as displayed, replies labelled
    with what produced them; replies: those labels, one per reply."""
    return {"history": [], "shown": [], "replies": [], "traces": [], "labels": [], "files": {}}


def stats_line(method_label: str, event) -> str:
    parts = [method_label]
    if event.seconds_to_first_token is not None:
        parts.append(f"first token {event.seconds_to_first_token:.2f} s")
    if event.tokens_per_second:
        parts.append(f"{event.tokens_per_second:.1f} tokens/s")
    parts.append(f"{len(event.token_ids)} new tokens")
    if event.done:
        parts.append(
            {"eos": "finished", "length": "hit the token limit", "stop": "stop text", "cancelled": "stopped"}.get(
                event.finish_reason, event.finish_reason or ""
            )
        )
    return " · ".join(p for p in parts if p)


def labelled(label: str, text: str) -> str:
    """A reply as the chat shows it: what produced it on top, then the text."""
    return f"*{label}*\n\n{text}"


def split_pickers(engine, adapters: list[str]) -> tuple[str, list[str], str]:
    """(language, more, task) pickers showing `adapters` in slot order: the first goes to the
    language picker when it is a language LoRA, the last to the task picker when it is a task LoRA."""
    roles = {a["name"]: a.get("role") for a in engine.adapters()}
    rest = list(adapters)
    language = rest.pop(0) if rest and roles.get(rest[0]) == "language" else NONE
    task = rest.pop() if rest and roles.get(rest[-1]) == "task" else NONE
    return language, rest, task


def build_chat_tab(studio: Studio) -> dict:
    engine = studio.engine
    chosen = default_selection(engine)
    start = saved_fusion(engine, chosen["fusion"])
    base = engine.base_info()
    with gr.Tab("Chat", id="chat"):
        gr.Markdown(
            f"**Base model:** {base.name} · {base.num_layers} layers · "
            f"{base.device} {base.dtype} — loaded once, never reloaded; "
            "every message fuses its LoRAs for that request only.",
            elem_id="base-model",
        )
        state = gr.State(new_session())
        with gr.Row(equal_height=False, elem_id="chat-layout"):
            with gr.Column(scale=1, min_width=300):
                fusion = gr.Dropdown(
                    fusion_choices(engine),
                    value=chosen["fusion"],
                    label="Saved fitted fusion",
                    info="Made in the Fit tab; picking one shows its method and adapters below. "
                    "(none): compose one below",
                    elem_id="fusion-dd",
                )
                fusion_note = gr.Markdown(
                    describe_fusion(engine, chosen["fusion"]), elem_id="fusion-note", elem_classes=["param-note"]
                )
                language = gr.Dropdown(
                    adapter_choices(engine, "language", True),
                    value=chosen["language"],
                    label="Language LoRA",
                    info="Slot 1 (LoRA-Flow: language first)",
                    elem_id="lang-dd",
                )
                task = gr.Dropdown(
                    adapter_choices(engine, "task", True),
                    value=chosen["task"],
                    label="Task LoRA",
                    info="Last slot (LoRA-Flow starts as all task)",
                    elem_id="task-dd",
                )
                extras = gr.Dropdown(
                    adapter_choices(engine),
                    value=[],
                    multiselect=True,
                    label="More LoRAs",
                    info="A third LoRA or more (placed between language and task), or a MixLoRA adapter",
                    elem_id="extra-dd",
                )
                method = gr.Dropdown(
                    method_choices(engine), value=chosen["method"], label="Fusion method", elem_id="method-dd"
                )
                with gr.Accordion("Method parameters", open=True):
                    panel = ParamPanel(engine, "chat").build(chosen["method"], start["params"] if start else None)
                with gr.Accordion("Generation", open=False):
                    system = gr.Textbox(
                        label="System prompt",
                        lines=2,
                        placeholder="empty = the model's default",
                        max_length=APP.max_prompt_chars,
                        elem_id="system-prompt",
                    )
                    temperature = gr.Slider(
                        0.0, 2.0, value=0.0, step=0.05, label="Temperature", info="0 = greedy", elem_id="temperature"
                    )
                    top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p", elem_id="top-p")
                    max_tokens = gr.Slider(
                        1,
                        APP.max_new_tokens,
                        value=APP.default_new_tokens,
                        step=1,
                        label="Max new tokens",
                        elem_id="max-tokens",
                    )
            with gr.Column(scale=3, min_width=480):  # below ~820 px the two columns stack
                chatbot = gr.Chatbot(
                    label="Conversation",
                    height=380,
                    elem_id="chatbot",
                    placeholder="Pick LoRAs and a method on the left, then say something.",
                )
                with gr.Row(elem_id="chat-send-row"):
                    # No max_length: a box that cuts a paste short does so silently; the engine
                    # refuses an overlong message in one sentence instead.
                    message = gr.Textbox(
                        show_label=False,
                        placeholder="Ask something… (Enter sends)",
                        scale=6,
                        min_width=200,
                        elem_id="chat-input",
                        autofocus=True,
                    )
                    send = gr.Button("Send", variant="primary", scale=1, min_width=80, elem_id="send-btn")
                    stop = gr.Button("Stop", variant="stop", scale=1, min_width=80, elem_id="stop-btn")
                    clear = gr.Button("Clear", scale=1, min_width=80, elem_id="clear-btn")
                examples = chat_examples(engine)
                example_buttons = []
                if examples:  # the note above the row: inside it, it was squeezed into a column of its own
                    gr.Markdown("Try (each picks the fusion that answers it):", elem_classes=["param-note"])
                    with gr.Row(elem_id="chat-examples"):
                        for i, example in enumerate(examples):
                            example_buttons.append(
                                gr.Button(example_label(example), size="sm", elem_id=f"chat-example-{i}")
                            )
                status = gr.Markdown(elem_id="chat-status", elem_classes=["stats-line"])
                why = TracePanel(studio).build()

    studio.pickers.language.append(language)
    studio.pickers.task.append(task)
    studio.pickers.adapters.append(extras)
    studio.pickers.fusions.append(fusion)
    pickers = [language, extras, task]

    def respond(data: dict, request: gr.Request):
        """Stream one reply; the last yield adds its trace to the session and the panel.

        Outputs: chatbot, message, state, status, send, then the trace panel's."""
        session = data[state]
        text = (data[message] or "").strip()
        skip = [gr.skip()] * len(why.outputs)
        if not text:
            yield gr.skip(), gr.skip(), session, "Type a message first.", gr.skip(), *skip
            return
        history = list(session["history"])
        shown = list(session["shown"]) + [{"role": "user", "content": text}]
        said = history + [{"role": "user", "content": text}]
        idle = gr.update(interactive=True)
        method_name = data[method]
        adapters = [data[language], *(data[extras] or []), data[task]]
        try:
            request_ = build_request(method_name, adapters, panel.collect(method_name, data), data[fusion])
            check_choice(engine, request_)
        except Exception as exc:
            line = error_line(exc)
            gr.Warning(line, duration=TOAST_SECONDS)
            yield gr.skip(), gr.skip(), session, f"⚠ {line}", idle, *skip
            return
        label = request_label(engine, request_)
        earlier = sorted({r for r in session["replies"] if r != label})
        mixed = (
            f" · earlier replies came from {', '.join(earlier)}: Clear for a fair comparison, or use Compare"
            if earlier
            else ""
        )
        flag = studio.flags.start(request, "chat")
        event = None
        try:
            yield shown, "", session, f"{label} · thinking…{mixed}", gr.update(interactive=False), *skip
            sampling = Sampling(
                max_new_tokens=int(data[max_tokens]), temperature=float(data[temperature]), top_p=float(data[top_p])
            )
            for event in engine.stream(
                request_, said, sampling, system=(data[system] or "").strip() or None, cancel=flag
            ):
                if event.queued:  # the engine's batch is full: say so until the reply starts
                    yield shown, gr.skip(), session, f"{label} · {queued_note(event.queued)}{mixed}", gr.skip(), *skip
                    continue
                reply = {"role": "assistant", "content": labelled(label, event.text)}
                yield shown + [reply], gr.skip(), session, stats_line(label, event) + mixed, gr.skip(), *skip
        except Exception as exc:  # FusionError: the user's to fix; anything else: logged
            line = error_line(exc)
            if not history:  # a first message that is too long alone: there is no history to clear
                line = line.replace(": shorten it or clear the history", ": shorten it")
            gr.Warning(line, duration=TOAST_SECONDS)
            yield session["shown"], text, session, f"⚠ {line}", idle, *skip
            return
        finally:
            studio.flags.finish(request, "chat", flag)
        reply_text = event.text if event is not None else ""
        if event is not None and event.finish_reason == "cancelled":
            reply_text += STOPPED
        session["history"] = said + [{"role": "assistant", "content": reply_text.removesuffix(STOPPED)}]
        session["shown"] = shown + [{"role": "assistant", "content": labelled(label, reply_text)}]
        session["replies"].append(label)
        line = stats_line(label, event) + mixed if event is not None else label
        panel_values = skip
        if event is not None and event.trace is not None:
            try:
                why.add(
                    session, event.trace, event.text, getattr(request, "session_hash", "") or "", label.split(" · ")[0]
                )
                panel_values = why.show(session, None, data[why.view], data[why.tail], data[why.mean])
            except Exception as exc:  # the reply stands even when its trace cannot be drawn
                log.exception("trace panel failed", exc_info=exc)
                line += " · the trace could not be shown (the server log has the details)"
        yield session["shown"], gr.skip(), session, line, idle, *panel_values

    def stop_generation(request: gr.Request):
        studio.flags.cancel(request, "chat")

    def clear_chat(request: gr.Request):
        studio.flags.cancel(request, "chat")
        return [], "", new_session(), "", gr.update(interactive=True), *why.cleared()

    inputs = {
        message,
        state,
        language,
        task,
        extras,
        method,
        fusion,
        system,
        temperature,
        top_p,
        max_tokens,
        why.view,
        why.tail,
        why.mean,
        *panel.components,
    }
    outputs = [chatbot, message, state, status, send, *why.outputs]
    # One event for Send and Enter: while a reply runs, both are ignored ("once") and Send is
    # disabled, so every reply in the chat has its trace and no reply runs unseen.
    sent = gr.on(
        [send.click, message.submit],
        respond,
        inputs,
        outputs,
        api_visibility="private",
        show_progress="minimal",
        concurrency_id="generate",
        trigger_mode="once",
    )
    stop.click(stop_generation, None, None, api_visibility="private", queue=False)
    # Clear also ends a reply in progress, so its last update cannot bring the old history back.
    clear.click(clear_chat, None, outputs, api_visibility="private", queue=False, cancels=[sent])

    # The pickers always show what a message will run: picking a method or an adapter leaves a
    # saved fusion, and picking a saved fusion shows its own method, adapters and params.
    def on_method(data: dict):
        name = data[method]
        current = [data[language], *(data[extras] or []), data[task]]
        chosen_now = [a for a in current if a and a != NONE]
        defaults = [a for a in (chosen["language"], chosen["task"]) if a != NONE]
        lang, more, task_name = split_pickers(engine, adapters_for(engine, name, chosen_now, defaults))
        return [NONE, "", lang, more, task_name, *panel.updates(name)]

    def on_adapters():
        return NONE, ""

    def showing(picked: dict) -> list:
        """A saved fusion in the pickers: its note, method, adapters and params (in the order of
        [fusion_note, method, *pickers, panel.note, *panel.components])."""
        lang, more, task_name = split_pickers(engine, picked["adapters"])
        return [
            describe_fusion(engine, picked["name"]),
            picked["method"],
            lang,
            more,
            task_name,
            *panel.updates(picked["method"], picked["params"]),
        ]

    def on_fusion(data: dict):
        picked = saved_fusion(engine, data[fusion])
        if picked is None:
            return [describe_fusion(engine, data[fusion])] + [gr.skip()] * (4 + 1 + len(panel.components))
        return showing(picked)

    method.input(
        on_method,
        {method, *pickers},
        [fusion, fusion_note, *pickers, panel.note, *panel.components],
        api_visibility="private",
        queue=False,
    )
    for picker in pickers:
        picker.input(on_adapters, None, [fusion, fusion_note], api_visibility="private", queue=False)
    fusion.input(
        on_fusion,
        {fusion},
        [fusion_note, method, *pickers, panel.note, *panel.components],
        api_visibility="private",
        queue=False,
    )

    def use_example(example: dict):
        """An example's question in the box and its fusion in the pickers (nothing is sent)."""
        picked = saved_fusion(engine, example["fusion"])
        if picked is None:  # removed from the library since the page was built
            gr.Warning(f"the fusion {example['fusion']} is no longer in the library", duration=TOAST_SECONDS)
            return [gr.skip()] * (3 + 1 + len(pickers) + 1 + len(panel.components))
        return [example["question"], picked["name"], *showing(picked)]

    for button, example in zip(example_buttons, examples):
        button.click(
            lambda example=example: use_example(example),
            None,
            [message, fusion, fusion_note, method, *pickers, panel.note, *panel.components],
            api_visibility="private",
            queue=False,
        )
    why.wire(state)
    return {"language": language, "task": task, "method": method, "fusion": fusion, "chatbot": chatbot}
