"""The "Why it answered so" panel: a reply's trace as a heatmap, highlighted tokens and files."""

from __future__ import annotations

import gradio as gr

from fusion import plots
from fusion.trace import Trace

from .common import Studio
from .constants import APP

VIEWS = [("Reply only", plots.VIEW_REPLY), ("Prompt tail + reply", plots.VIEW_TAIL), ("All tokens", plots.VIEW_ALL)]


def reply_label(index: int, source: str, text: str) -> str:
    words = " ".join(text.split())
    return f"Reply {index + 1} · {source}: {words[:40] + ('…' if len(words) > 40 else '')}"


def trace_info(trace: Trace, layer: int | None) -> str:
    if not trace.slot_names:
        return f"`{trace.method}` · no adapter is applied, so there are no weights to show"
    where = "mean over layers" if layer is None else f"layer {layer}"
    kind = {"gate": "per-token gates", "router": "per-token routing", "static": "fixed weights"}[trace.kind]
    tokens, layers, slots = trace.shape
    return (
        f"`{trace.method}` · {kind} · {tokens} tokens ({trace.prompt_tokens} prompt) × {layers} layers × "
        f"{slots} slots ({', '.join(trace.slot_names) or 'none'}) · highlight: {where}"
    )


def diverging(trace: Trace, slot: str | None) -> bool:
    """Only LoRA-Flow's two-slot difference has a sign; every other score is a weight or a probability."""
    return trace.kind == "gate" and len(trace.slot_names) == 2 and slot in (None, plots.DIFFERENCE)


def highlight_label(trace: Trace, slot: str | None) -> str:
    if not trace.slot_names:
        return "Reply tokens (no adapter is applied, so there is nothing to score)"
    if trace.kind == "router" and slot in (None, plots.TOP_EXPERT):
        return "Reply tokens (score 0…1: the top expert's router probability)"
    if diverging(trace, slot):
        return f"Reply tokens (score in [-1, 1]: + leans to {trace.slot_names[1]}, − to {trace.slot_names[0]})"
    if trace.kind == "router":
        return f"Reply tokens (score 0…1: the router probability of {slot})"
    return f"Reply tokens (score: the weight of {slot or trace.slot_names[-1]}, clipped to [-1, 1])"


def intro(trace: Trace | None) -> str:
    """What the panel shows for this reply's method, in a sentence or two."""
    if trace is None:
        return (
            "Send a message: each reply's trace shows, layer by layer and token by token, how much each "
            "LoRA (or expert) was used. Hover a cell for every exact weight."
        )
    if not trace.slot_names:
        return f"`{trace.method}` applies no adapter: the reply is the base model's own."
    if trace.kind == "gate":
        if len(trace.slot_names) == 2:
            return (
                f"`{trace.method}`: per-token gates. Rows are layers, columns tokens; the colour is "
                f"{trace.slot_names[1]}'s weight minus {trace.slot_names[0]}'s (red: more "
                f"{trace.slot_names[1]}, blue: more {trace.slot_names[0]}). Hover a cell for every exact weight."
            )
        return (
            f"`{trace.method}`: per-token gates over {len(trace.slot_names)} LoRAs; *Colour by* picks the "
            "LoRA whose weight is shown. Hover a cell for every exact weight."
        )
    if trace.kind == "router":
        return (
            f"`{trace.method}`: a router picks experts per token and layer. The colour is the top-1 expert; "
            "*Colour by* an expert shows its probability (0…1). Hover a cell for the top-k chosen."
        )
    return (
        f"`{trace.method}`: fixed weights, the same for every token, so the heatmap is layers × LoRAs "
        "(darker = more weight). Hover a cell for the exact value."
    )


class TracePanel:
    def __init__(self, studio: Studio):
        self.studio = studio

    def build(self) -> TracePanel:
        with gr.Accordion("Why it answered so", open=True, elem_id="why-panel"):
            self.intro = gr.Markdown(intro(None), elem_id="trace-intro", elem_classes=["param-note"])
            with gr.Row(elem_id="trace-controls"):
                self.reply = gr.Dropdown(label="Reply", choices=[], value=None, scale=3, elem_id="trace-reply-dd")
                self.view = gr.Radio(VIEWS, value=plots.VIEW_TAIL, label="Tokens shown", scale=3, elem_id="trace-view")
                self.tail = gr.Number(
                    value=APP.prompt_tail,
                    precision=0,
                    minimum=0,
                    maximum=4096,
                    scale=1,
                    label="Prompt tokens",
                    elem_id="trace-tail",
                )
                self.slot = gr.Dropdown(label="Colour by", choices=[], value=None, scale=2, elem_id="trace-slot-dd")
                self.module = gr.Dropdown(
                    label="Module", choices=[], value=None, visible=False, scale=2, elem_id="trace-module-dd"
                )
            self.heatmap = gr.Plot(
                plots.empty_figure("Send a message to see which LoRA each layer used."),
                label="Gate / router weights per layer and token",
                elem_id="heatmap",
            )
            with gr.Row():
                self.mean = gr.Checkbox(value=True, label="Average over layers", scale=1, elem_id="highlight-mean")
                self.layer = gr.Slider(
                    0, 29, value=0, step=1, label="Layer to highlight by", scale=3, elem_id="highlight-layer"
                )
            self.tokens = gr.HighlightedText(
                label="Reply tokens", show_legend=False, combine_adjacent=False, elem_id="token-highlight"
            )
            with gr.Row(elem_id="trace-info-row"):
                self.info = gr.Markdown(elem_id="trace-info", elem_classes=["stats-line"])
                self.json_file = gr.DownloadButton(
                    "Trace JSON", visible=False, size="sm", scale=0, elem_id="trace-json-btn"
                )
                self.csv_file = gr.DownloadButton(
                    "Trace CSV", visible=False, size="sm", scale=0, elem_id="trace-csv-btn"
                )
        return self

    @property
    def controls(self) -> list:
        return [self.reply, self.view, self.tail, self.slot, self.module, self.mean, self.layer]

    @property
    def outputs(self) -> list:
        """Everything a new or re-selected trace updates."""
        return [
            self.reply,
            self.slot,
            self.module,
            self.layer,
            self.heatmap,
            self.tokens,
            self.info,
            self.json_file,
            self.csv_file,
            self.intro,
        ]

    def wire(self, state: gr.State) -> None:
        self.reply.input(
            self.select, [state, self.reply, self.view, self.tail, self.mean], self.outputs, api_visibility="private"
        )
        for control in (self.view, self.tail, self.slot, self.module, self.mean):
            control.input(
                self.redraw, [state] + self.controls, [self.heatmap, self.tokens, self.info], api_visibility="private"
            )
        self.layer.input(
            self.redraw, [state] + self.controls, [self.heatmap, self.tokens, self.info], api_visibility="private"
        )

    # ---- handlers --------------------------------------------------------------------------------
    @staticmethod
    def _index(state: dict, index) -> int | None:
        """A valid reply index (the latest when `index` is missing or stale), or None."""
        count = len(state.get("traces", []))
        if not count:
            return None
        try:
            index = int(index)
        except (TypeError, ValueError):
            return count - 1
        return index if 0 <= index < count else count - 1

    def figures(self, trace: Trace, view, tail, slot, module, mean, layer) -> tuple:
        chosen_layer = None if mean else int(layer or 0)
        figure = plots.heatmap(trace, view or plots.VIEW_TAIL, int(tail or 0), slot, module)
        tokens = gr.update(
            value=plots.token_scores(trace, chosen_layer, slot),
            label=highlight_label(trace, slot),
            show_legend=diverging(trace, slot),
        )
        return figure, tokens, trace_info(trace, chosen_layer)

    def redraw(self, state, reply, view, tail, slot, module, mean, layer):
        index = self._index(state, reply)
        if index is None:
            return gr.skip(), gr.skip(), gr.skip()
        trace = state["traces"][index]
        return self.figures(trace, view, tail, slot, module, mean, layer)

    def select(self, state, reply, view, tail, mean):
        """Another reply picked: show its trace from scratch."""
        return self.show(state, reply, view, tail, mean)

    def show(self, state, index, view, tail, mean):
        """Show one reply's trace (default: the latest) with fresh slot, module and layer choices."""
        index = self._index(state, index)
        if index is None:
            return self.cleared()
        trace = state["traces"][index]
        slot, module = plots.default_slot(trace), None
        modules = plots.module_options(trace)
        layers = int(trace.weights.shape[1])
        figure, tokens, info = self.figures(trace, view, tail, slot, module, mean, 0)
        files = state.get("files", {}).get(index)
        labels = state.get("labels", [])
        return (
            gr.update(choices=[(label, i) for i, label in enumerate(labels)], value=index),
            # A static trace is layers × LoRAs already: there is nothing to colour by.
            gr.update(choices=plots.slot_options(trace), value=slot, visible=trace.kind != "static"),
            gr.update(choices=modules, value=modules[0] if modules else None, visible=bool(modules)),
            gr.update(maximum=max(1, layers - 1), value=0),
            figure,
            tokens,
            info,
            gr.update(value=files[0], visible=True) if files else gr.update(visible=False),
            gr.update(value=files[1], visible=True) if files else gr.update(visible=False),
            intro(trace),
        )

    def cleared(self) -> tuple:
        return (
            gr.update(choices=[], value=None),
            gr.update(choices=[], value=None),
            gr.update(choices=[], value=None, visible=False),
            gr.update(value=0),
            plots.empty_figure("Send a message to see which LoRA each layer used."),
            None,
            "",
            gr.update(visible=False),
            gr.update(visible=False),
            intro(None),
        )

    def add(self, state: dict, trace: Trace, text: str, session: str, source: str | None = None) -> None:
        """Keep a finished reply's trace in the session, with its download files; `source` names
        what produced the reply (default: the trace's method)."""
        index = len(state.setdefault("traces", []))
        state["traces"].append(trace)
        state.setdefault("labels", []).append(reply_label(index, source or trace.method, text))
        stem = f"trace-{(session or 'local')[:10]}-{index + 1}-{trace.method}"
        state.setdefault("files", {})[index] = self.studio.write_trace_files(trace, stem)
