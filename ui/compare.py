"""Compare tab: one prompt, 2–4 fusions side by side, streaming together; optional math scoring."""

from __future__ import annotations

import gradio as gr

from fusion import plots
from fusion.api import Backend, Sampling
from fusion.errors import FusionError
from fusion.math_data import EVAL_LANGUAGES, eval_examples

from .choices import (
    adapters_for,
    build_request,
    check_choice,
    default_selection,
    describe_fusion,
    fusion_choices,
    kind_choices,
    method_choices,
    saved_fusion,
)
from .common import TOAST_SECONDS, ParamPanel, Studio, error_line
from .constants import APP, NONE
from .side_by_side import run_side_by_side, score_columns, stats_text

FIRST_SHOWN = min(3, APP.max_compare)  # columns shown when the tab opens
FITTED_LATER = ["cat", "lorahub"]  # saved fits over the default pair, after the first three columns


def first_columns(engine: Backend, chosen: dict) -> list[dict]:
    """What each column opens on, left to right: the LoRA-Flow gates fitted for the default pair
    (or LoRA-Flow unfitted when none are saved), the linear average of the pair, the task LoRA
    alone (what the fusion must beat), then the pair's other saved fits and the base model."""
    pair = chosen["adapters"]
    fitted = {f["method"]: f["name"] for f in engine.fusions() if f["adapters"] == pair and len(pair) == 2}
    known = {m["name"] for m in engine.methods()}

    def plain(method, adapters):
        return {"name": NONE, "method": method, "adapters": adapters, "params": None}

    columns = []
    if len(pair) == 2:
        if "lora_flow" in fitted:
            columns.append(saved_fusion(engine, fitted["lora_flow"]))
        elif "lora_flow" in known:
            columns.append(plain("lora_flow", pair))
        if "linear" in known:
            columns.append(plain("linear", pair))
    task = chosen.get("task")
    if task not in (None, NONE) and "single" in known:
        columns.append(plain("single", [task]))
    columns += [saved_fusion(engine, fitted[m]) for m in FITTED_LATER if m in fitted]
    if "base" in known:
        columns.append(plain("base", pair))
    while len(columns) < APP.max_compare:
        columns.append(columns[-1] if columns else plain(chosen["method"], pair))
    return columns[: APP.max_compare]


def build_compare_tab(studio: Studio) -> dict:
    engine = studio.engine
    chosen = default_selection(engine)
    columns = []
    with gr.Tab("Compare", id="compare"):
        gr.Markdown(
            "One prompt, several fusions at once. Each column streams its own reply with time to "
            "first token and tokens per second (columns share the CPU, so rates are per column while "
            "all run). The columns open on the fitted LoRA-Flow fusion, the linear average of its two "
            "LoRAs and the task LoRA alone.",
            elem_classes=["param-note"],
        )
        prompt = gr.Textbox(label="Prompt", lines=2, placeholder="e.g. ¿Cuánto es 12 + 7?", elem_id="compare-input")
        with gr.Row(equal_height=True, elem_id="compare-controls"):
            count = gr.Radio(
                [str(n) for n in range(2, APP.max_compare + 1)],
                value=str(FIRST_SHOWN),
                label="Columns",
                scale=1,
                min_width=220,
                elem_id="compare-n",
            )
            max_tokens = gr.Slider(
                1,
                APP.max_new_tokens,
                value=min(64, APP.default_new_tokens),
                step=1,
                label="Max new tokens",
                scale=2,
                min_width=200,
                elem_id="compare-max-tokens",
            )
            temperature = gr.Slider(
                0.0,
                2.0,
                value=0.0,
                step=0.05,
                label="Temperature",
                scale=2,
                min_width=200,
                elem_id="compare-temperature",
            )
            with gr.Column(scale=1, min_width=160):
                run = gr.Button("Compare", variant="primary", elem_id="compare-btn")
                stop = gr.Button("Stop", variant="stop", elem_id="compare-stop-btn")
        with gr.Row(equal_height=False, elem_id="compare-columns"):
            for i, first in enumerate(first_columns(engine, chosen)):
                with gr.Column(visible=i < FIRST_SHOWN, min_width=260) as column:
                    method = gr.Dropdown(
                        method_choices(engine),
                        value=first["method"],
                        label=f"Method {i + 1}",
                        elem_id=f"compare-method-{i}",
                    )
                    adapters = gr.Dropdown(
                        kind_choices(engine, first["method"]),
                        value=first["adapters"],
                        multiselect=True,
                        label="Adapters (in slot order)",
                        elem_id=f"compare-adapters-{i}",
                    )
                    fusion = gr.Dropdown(
                        fusion_choices(engine),
                        value=first["name"],
                        label="…or a saved fusion",
                        elem_id=f"compare-fusion-{i}",
                    )
                    note = gr.Markdown(describe_fusion(engine, first["name"]), elem_classes=["param-note"])
                    with gr.Accordion("Parameters", open=False):
                        panel = ParamPanel(engine, f"compare-{i}").build(first["method"], first["params"])
                    stats = gr.Markdown(elem_id=f"compare-stats-{i}", elem_classes=["stats-line"])
                    reply = gr.Markdown(elem_id=f"compare-out-{i}", elem_classes=["compare-out"], container=True)
                    heatmap = gr.Plot(None, show_label=False, elem_id=f"compare-heatmap-{i}")
                columns.append(
                    {
                        "column": column,
                        "method": method,
                        "adapters": adapters,
                        "fusion": fusion,
                        "panel": panel,
                        "stats": stats,
                        "reply": reply,
                        "heatmap": heatmap,
                    }
                )
                wire_column(engine, chosen, method, adapters, fusion, note, panel)
                studio.pickers.by_method.append((adapters, method))
                studio.pickers.fusions.append(fusion)
        score = build_scoring(studio, columns, count)

    def shown(n):
        return [gr.update(visible=i < int(n)) for i in range(APP.max_compare)]

    count.change(shown, count, [c["column"] for c in columns], api_visibility="private", queue=False)

    def compare(data: dict, request: gr.Request):
        n = int(data[count])
        requests = column_requests(engine, columns[:n], data)
        outputs = [c[key] for c in columns[:n] for key in ("stats", "reply", "heatmap")]
        blank = [gr.skip()] * (3 * (APP.max_compare - n))
        flag = studio.flags.start(request, "compare")
        try:
            sampling = Sampling(max_new_tokens=int(data[max_tokens]), temperature=float(data[temperature])).validate()
            text = data[prompt]
            if not (text or "").strip():
                raise FusionError("type a prompt to compare")
            drawn = set()
            for results in run_side_by_side(engine, requests, text, sampling, None, flag):
                out = []
                for i, result in enumerate(results):
                    figure = gr.skip()
                    if result.done and result.trace is not None and i not in drawn:
                        drawn.add(i)
                        figure = plots.heatmap(result.trace, plots.VIEW_TAIL, APP.prompt_tail, compact=True)
                    out += [stats_text(result), result.text, figure]
                yield *out, *blank
        except Exception as exc:
            gr.Warning(error_line(exc), duration=TOAST_SECONDS)
            yield *[gr.skip()] * len(outputs), *blank
        finally:
            studio.flags.finish(request, "compare", flag)

    inputs = {prompt, count, max_tokens, temperature, *column_inputs(columns)}
    outputs = [c[key] for c in columns for key in ("stats", "reply", "heatmap")]
    gr.on(
        [run.click, prompt.submit],
        compare,
        inputs,
        outputs,
        api_visibility="private",
        show_progress="hidden",
        concurrency_id="generate",
        trigger_mode="once",
    )

    def stop_all(request: gr.Request):
        studio.flags.cancel(request, "compare")

    stop.click(stop_all, None, None, api_visibility="private", queue=False)
    return {"prompt": prompt, "columns": columns, "score": score}


def wire_column(engine: Backend, chosen: dict, method, adapters, fusion, note, panel: ParamPanel) -> None:
    """A column shows what it will run: a method offers the adapters of its kind and leaves a
    saved fusion; a saved fusion shows its own method, adapters and params."""
    defaults = chosen["adapters"]

    def on_method(data: dict):
        name = data[method]
        kept = adapters_for(engine, name, list(data[adapters] or []), defaults)
        return [NONE, "", gr.update(choices=kind_choices(engine, name), value=kept), *panel.updates(name)]

    def on_fusion(data: dict):
        picked = saved_fusion(engine, data[fusion])
        if picked is None:
            return [describe_fusion(engine, data[fusion])] + [gr.skip()] * (2 + 1 + len(panel.components))
        return [
            describe_fusion(engine, picked["name"]),
            picked["method"],
            gr.update(choices=kind_choices(engine, picked["method"]), value=picked["adapters"]),
            *panel.updates(picked["method"], picked["params"]),
        ]

    method.input(
        on_method,
        {method, adapters},
        [fusion, note, adapters, panel.note, *panel.components],
        api_visibility="private",
        queue=False,
    )
    adapters.input(lambda: (NONE, ""), None, [fusion, note], api_visibility="private", queue=False)
    fusion.input(
        on_fusion,
        {fusion},
        [note, method, adapters, panel.note, *panel.components],
        api_visibility="private",
        queue=False,
    )


def column_inputs(columns: list[dict]) -> list:
    return [comp for c in columns for comp in [c["method"], c["adapters"], c["fusion"], *c["panel"].components]]


def column_requests(engine: Backend, columns: list[dict], data: dict) -> list:
    """FusionRequests (or the FusionError to show) of the given columns, from a handler's inputs."""
    requests = []
    for c in columns:
        method = data[c["method"]]
        try:
            request = build_request(method, data[c["adapters"]], c["panel"].collect(method, data), data[c["fusion"]])
            check_choice(engine, request)
            requests.append(request)
        except FusionError as exc:
            requests.append(exc)
    return requests


def build_scoring(studio: Studio, columns: list[dict], count: gr.Radio) -> dict:
    """Score the shown columns on a few templated math problems (exact final number)."""
    engine = studio.engine
    with gr.Accordion("Score these columns on math problems", open=False, elem_id="score-panel"):
        with gr.Row():
            language = gr.Dropdown(
                list(EVAL_LANGUAGES),
                value="es" if "es" in EVAL_LANGUAGES else EVAL_LANGUAGES[0],
                label="Problem language",
                min_width=160,
                elem_id="score-lang",
            )
            size = gr.Slider(
                1, APP.max_score_problems, value=8, step=1, label="Problems", min_width=200, elem_id="score-n"
            )
            limit = gr.Slider(
                8, 256, value=64, step=8, label="Max new tokens per answer", min_width=200, elem_id="score-max-tokens"
            )
            go = gr.Button("Score", min_width=120, elem_id="score-btn")
        table = gr.Dataframe(
            headers=["column", "correct", "problems", "accuracy"], interactive=False, elem_id="score-table"
        )

    def score(data: dict, request: gr.Request, progress=gr.Progress()):
        requests = column_requests(engine, columns[: int(data[count])], data)
        problems = eval_examples(data[language], int(data[size]))
        flag = studio.flags.start(request, "compare")
        progress(0.0, desc="answering")
        try:
            return score_columns(
                engine,
                requests,
                problems,
                Sampling(max_new_tokens=int(data[limit])),
                flag,
                lambda done, total: progress(done / total, desc=f"{done}/{total} answers"),
            )
        finally:
            studio.flags.finish(request, "compare", flag)

    go.click(
        score,
        {language, size, limit, count, *column_inputs(columns)},
        table,
        api_visibility="private",
        concurrency_id="generate",
    )
    return {"button": go, "table": table}
