"""Chat tab: pick LoRAs and a fusion method, talk to the fused model, see why it answered so."""

from __future__ import annotations

import gradio as gr

from fusion.generate import Sampling

from .common import (ParamPanel, Studio, adapter_choices, default_selection, describe_fusion, error_line,
                     fusion_choices, make_request, method_choices, parse_adapters)
from .constants import APP, NONE
from .trace_panel import TracePanel


STOPPED = " [stopped]"  # shown after a reply cut short; never sent back to the model


def new_session() -> dict:
    return {"history": [], "traces": [], "labels": [], "files": {}}


def stats_line(method_label: str, event) -> str:
    parts = [method_label]
    if event.seconds_to_first_token is not None:
        parts.append(f"first token {event.seconds_to_first_token:.2f} s")
    if event.tokens_per_second:
        parts.append(f"{event.tokens_per_second:.1f} tokens/s")
    parts.append(f"{len(event.token_ids)} new tokens")
    if event.done:
        parts.append({"eos": "finished", "length": "hit the token limit", "stop": "stop text",
                      "cancelled": "stopped"}.get(event.finish_reason, event.finish_reason or ""))
    return " · ".join(p for p in parts if p)


def request_label(engine, request) -> str:
    try:
        method, adapters, _ = engine.resolve(request)
    except Exception:  # the run itself reports the problem
        return request.method
    names = " + ".join(a.name for a in adapters)
    fused = f"**{request.fusion}** ({method.name})" if request.fusion else f"**{method.name}**"
    return f"{fused} over {names}" if names else fused


def matching_kind(engine, method_name: str, adapters: list[str]) -> list[str]:
    """The pickers may hold LoRAs while the method wants a MixLoRA adapter (or the reverse): keep
    the adapters of the kind the method declares, when there are any."""
    wanted = next((m["adapter_kind"] for m in engine.methods() if m["name"] == method_name), None)
    kinds = {a["name"]: a.get("kind", "lora") for a in engine.adapters()}
    kept = [a for a in adapters if kinds.get(a, wanted) == wanted]
    return kept or adapters


def build_chat_tab(studio: Studio) -> dict:
    engine = studio.engine
    chosen = default_selection(engine)
    base = engine.base
    with gr.Tab("Chat", id="chat"):
        gr.Markdown(f"**Base model:** {base.name} · {base.config.num_hidden_layers} layers · "
                    f"{base.device} {str(base.dtype).replace('torch.', '')} — loaded once, never reloaded; "
                    "every message fuses its LoRAs for that request only.", elem_id="base-model")
        state = gr.State(new_session())
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=300):
                language = gr.Dropdown(adapter_choices(engine, "language", True), value=chosen["language"],
                                       label="Language LoRA", info="Slot 1 (LoRA-Flow: language first)",
                                       elem_id="lang-dd")
                task = gr.Dropdown(adapter_choices(engine, "task", True), value=chosen["task"], label="Task LoRA",
                                   info="Last slot (LoRA-Flow starts as all task)", elem_id="task-dd")
                extras = gr.Dropdown(adapter_choices(engine), value=[], multiselect=True, label="More LoRAs",
                                     info="A third LoRA or more (placed between language and task), or a MixLoRA adapter",
                                     elem_id="extra-dd")
                method = gr.Dropdown(method_choices(engine), value=chosen["method"], label="Fusion method",
                                     elem_id="method-dd")
                with gr.Accordion("Method parameters", open=True):
                    panel = ParamPanel(engine, "chat").build(chosen["method"])
                fusion = gr.Dropdown(fusion_choices(engine), value=chosen["fusion"], label="…or a saved fitted fusion",
                                     info="Made in the Fit tab; brings its own method and adapters",
                                     elem_id="fusion-dd")
                fusion_note = gr.Markdown(elem_classes=["param-note"])
                with gr.Accordion("Generation", open=False):
                    system = gr.Textbox(label="System prompt", lines=2, placeholder="empty = the model's default",
                                        max_length=APP.max_prompt_chars, elem_id="system-prompt")
                    temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="Temperature",
                                            info="0 = greedy", elem_id="temperature")
                    top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p", elem_id="top-p")
                    max_tokens = gr.Slider(1, APP.max_new_tokens, value=APP.default_new_tokens, step=1,
                                           label="Max new tokens", elem_id="max-tokens")
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(label="Conversation", height=380, elem_id="chatbot",
                                     placeholder="Pick LoRAs and a method on the left, then say something.")
                with gr.Row():
                    message = gr.Textbox(show_label=False, placeholder="Ask something… (Enter sends)", scale=6,
                                         max_length=APP.max_prompt_chars, elem_id="chat-input", autofocus=True)
                    send = gr.Button("Send", variant="primary", scale=1, min_width=80, elem_id="send-btn")
                    stop = gr.Button("Stop", variant="stop", scale=1, min_width=80, elem_id="stop-btn")
                    clear = gr.Button("Clear", scale=1, min_width=80, elem_id="clear-btn")
                status = gr.Markdown(elem_id="chat-status", elem_classes=["stats-line"])
                why = TracePanel(studio).build()

    studio.pickers.language.append(language)
    studio.pickers.task.append(task)
    studio.pickers.adapters.append(extras)
    studio.pickers.fusions.append(fusion)

    def respond(request: gr.Request, text, session, lang, task_name, more, method_name, fusion_name, system_text,
                temp, p, limit, view, tail, mean, *pool):
        """Stream one reply; the last yield adds its trace to the session and the panel."""
        history = list(session["history"])
        text = (text or "").strip()
        if not text:
            yield gr.skip(), gr.skip(), session, "Type a message first.", *[gr.skip()] * len(why.outputs)
            return
        shown = history + [{"role": "user", "content": text}]
        skip = [gr.skip()] * len(why.outputs)
        adapters = matching_kind(engine, method_name, parse_adapters([lang] + list(more or []) + [task_name]))
        request_ = make_request(engine, method_name, adapters, panel.collect(method_name, list(pool)), fusion_name)
        label = request_label(engine, request_)
        flag = studio.flags.start(request, "chat")
        try:
            yield shown, "", session, f"{label} · thinking…", *skip
            sampling = Sampling(max_new_tokens=int(limit), temperature=float(temp), top_p=float(p))
            event = None
            said = [{"role": m["role"], "content": m["content"].removesuffix(STOPPED)} for m in shown]
            for event in engine.stream(request_, said, sampling, system=(system_text or "").strip() or None,
                                       cancel=flag):
                reply = {"role": "assistant", "content": event.text}
                yield shown + [reply], gr.skip(), session, stats_line(label, event), *skip
        except Exception as exc:  # FusionError: the user's to fix; anything else: logged
            line = error_line(exc)
            gr.Warning(line)
            yield history, text, session, f"⚠ {line}", *skip
            return
        finally:
            studio.flags.finish(request, "chat", flag)
        reply_text = event.text if event is not None else ""
        if event is not None and event.finish_reason == "cancelled":
            reply_text += STOPPED
        session["history"] = shown + [{"role": "assistant", "content": reply_text}]
        if event is not None and event.trace is not None:
            why.add(session, event.trace, event.text, getattr(request, "session_hash", "") or "")
            panel_values = why.show(session, None, view, tail, mean)
        else:
            panel_values = skip
        yield session["history"], gr.skip(), session, stats_line(label, event), *panel_values

    def stop_generation(request: gr.Request):
        studio.flags.cancel(request, "chat")

    def clear_chat(request: gr.Request):
        studio.flags.cancel(request, "chat")
        session = new_session()
        return [], "", session, "", *why.cleared()

    inputs = [message, state, language, task, extras, method, fusion, system, temperature, top_p, max_tokens,
              why.view, why.tail, why.mean, *panel.components]
    outputs = [chatbot, message, state, status, *why.outputs]
    sent = [send.click(respond, inputs, outputs, api_visibility="private", show_progress="minimal",
                       concurrency_id="generate"),
            message.submit(respond, inputs, outputs, api_visibility="private", show_progress="minimal",
                           concurrency_id="generate")]
    stop.click(stop_generation, None, None, api_visibility="private", queue=False)
    # Clear also ends a reply in progress, so its last update cannot bring the old history back.
    clear.click(clear_chat, None, outputs, api_visibility="private", queue=False, cancels=sent)
    method.change(panel.updates, method, [panel.note] + panel.components, api_visibility="private", queue=False)
    fusion.change(lambda name: describe_fusion(engine, name), fusion, fusion_note, api_visibility="private",
                  queue=False)
    why.wire(state)
    return {"language": language, "task": task, "method": method, "fusion": fusion, "chatbot": chatbot}
