"""Fit tab: learn a fusion's weights (LoRA-Flow gates, CAT logits, LoraHub weights, …) from examples."""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path

import gradio as gr

from fusion import plots
from fusion.api import Backend
from fusion.errors import FusionError

from .choices import adapter_choices, default_selection, method_choices, parse_adapters
from .common import TOAST_SECONDS, ParamPanel, Studio, error_line
from .constants import APP

EXAMPLE_JSONL = (
    '{"prompt": "¿Cuánto es 12 + 7?", "response": "12 + 7 = 19. La respuesta es 19."}\n'
    '{"prompt": "Ana tiene 5 manzanas y compra 3 más. ¿Cuántas tiene?", '
    '"response": "5 + 3 = 8. La respuesta es 8."}'
)


def train_options(epochs, lr, batch_size, max_steps) -> dict:
    """Only what the user set; the method's own defaults fill the rest (a learning rate of 0 means
    the method's default)."""
    options = {}
    if lr is not None and lr != "" and float(lr) == 0:
        lr = None
    for key, value, cast in (
        ("epochs", epochs, int),
        ("lr", lr, float),
        ("batch_size", batch_size, int),
        ("max_steps", max_steps, int),
    ):
        if value not in (None, ""):
            options[key] = cast(value)
    for key in ("epochs", "batch_size"):
        if key in options and options[key] < 1:
            raise FusionError(f"{key.replace('_', ' ')} must be at least 1, got {options[key]}")
    if options.get("lr") is not None and not options["lr"] > 0:
        raise FusionError(f"the learning rate must be positive (or 0 for the method's default), got {options['lr']}")
    if options.get("max_steps", 0) < 0:
        raise FusionError("max steps must be 0 (the epochs decide) or positive")
    return options


def check_free_name(engine: Backend, name: str, overwrite: bool, method: str) -> None:
    """Refuse a taken name before training rather than after it."""
    spec = next((m for m in engine.methods() if m["name"] == method), {})
    taken = (
        {a["name"] for a in engine.adapters()}
        if spec.get("fit_from_scratch")
        else {f["name"] for f in engine.fusions()}
    )
    if name in taken and not overwrite:
        raise FusionError(f"{name!r} is already in the library; choose another name or tick replace")


def fit_in_background(engine: Backend, method, adapters, examples, params, train, name, overwrite, flag):
    """Run engine.fit on a thread, saving the result under `name`; yields ("progress", Progress)
    then ("done", artifact), ("cancelled", None) or ("error", line).

    The result is saved only when the fit ran to its end: a cancelled fit (Cancel, or the page
    closed) leaves nothing behind, so the name stays free for the next try.
    """
    events: queue.Queue = queue.Queue()

    def work():
        try:
            artifact = engine.fit(
                method,
                adapters,
                examples,
                params,
                train=train,
                save_as=name,
                overwrite=overwrite,
                on_progress=lambda p: events.put(("progress", p)),
                cancel=flag,
            )
            # The artifact, not the flag, says whether it was saved: the flag may be set after saving.
            events.put(("cancelled", None) if artifact.meta.get("cancelled") else ("done", artifact))
        except Exception as exc:
            events.put(("error", error_line(exc)))

    worker = threading.Thread(target=work, name=f"fit-{name}", daemon=True)
    worker.start()
    try:
        while True:
            try:
                kind, payload = events.get(timeout=0.25)
            except queue.Empty:
                if not worker.is_alive() and events.empty():
                    yield "error", "training stopped without a result"
                    return
                continue
            yield kind, payload
            if kind in ("done", "cancelled", "error"):
                return
    finally:  # the browser went away or the caller stopped early: stop the thread after its step
        if worker.is_alive():
            flag.set()


def finished_line(artifact, seconds: float) -> str:
    meta = artifact.meta
    losses = meta.get("losses") or []
    steps = f"{len(losses)} steps" + (f", final loss {losses[-1]:.4f}" if losses else "")
    what = "adapter" if artifact.adapters == [artifact.name] else "fusion"
    return (
        f"✔ Saved {what} **{artifact.name}** — `{artifact.method}` over {', '.join(artifact.adapters)}; "
        f"{steps} in {seconds:.1f} s. It is now in the Chat and Compare pickers."
    )


def build_fit_tab(studio: Studio) -> dict:
    engine = studio.engine
    chosen = default_selection(engine)
    fittable = method_choices(engine, fittable=True)
    names = [value for _, value in fittable]
    first = "lora_flow" if "lora_flow" in names else (names[0] if names else None)
    with gr.Tab("Fit", id="fit"):
        gr.Markdown(
            "Learn a fusion from examples: LoRA-Flow gates, CAT logits or LoraHub weights over the chosen "
            "LoRAs (the LoRAs and base model stay frozen). One JSON object per line with `prompt` and "
            "`response` (or a `messages` list); the loss is taken on the response only.",
            elem_classes=["param-note"],
        )
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                examples = gr.Textbox(
                    label="Examples (JSONL)",
                    lines=10,
                    max_lines=18,
                    placeholder=EXAMPLE_JSONL,
                    max_length=APP.max_fit_chars,
                    elem_id="fit-examples",
                )
                upload = gr.File(
                    label="…or upload a .jsonl file",
                    file_types=[".jsonl", ".json", ".txt"],
                    type="filepath",
                    height=120,
                    elem_id="fit-upload",
                )
                loss = gr.Plot(
                    plots.empty_figure("The loss curve appears here while training.", height=300),
                    show_label=False,
                    elem_id="fit-loss",
                )
            with gr.Column(scale=2, min_width=300):
                method = gr.Dropdown(fittable, value=first, label="Method to fit", elem_id="fit-method-dd")
                adapters = gr.Dropdown(
                    adapter_choices(engine),
                    value=chosen["adapters"],
                    multiselect=True,
                    label="Adapters (in slot order: language first, task last)",
                    elem_id="fit-adapters",
                )
                with gr.Accordion("Method parameters", open=False):
                    panel = ParamPanel(engine, "fit", for_fit=True).build(first)
                with gr.Row():
                    epochs = gr.Number(value=1, precision=0, minimum=1, label="Epochs", elem_id="fit-epochs")
                    lr = gr.Number(
                        value=0, minimum=0, label="Learning rate", info="0 = the method's default", elem_id="fit-lr"
                    )
                with gr.Row():
                    batch = gr.Number(value=4, precision=0, minimum=1, label="Batch size", elem_id="fit-batch")
                    max_steps = gr.Number(
                        value=0,
                        precision=0,
                        minimum=0,
                        label="Max steps",
                        info="a cap: the epochs end sooner on few examples (0 = no cap)",
                        elem_id="fit-max-steps",
                    )
                name = gr.Textbox(label="Save as", placeholder="e.g. es-math-gates", elem_id="fit-name")
                overwrite = gr.Checkbox(
                    value=False, label="Replace a saved fusion of that name", elem_id="fit-overwrite"
                )
                gr.Markdown(
                    "**Cancel** stops after the current step; a cancelled fit is not saved.",
                    elem_classes=["param-note"],
                )
                with gr.Row():
                    train = gr.Button("Train", variant="primary", elem_id="fit-btn")
                    cancel = gr.Button("Cancel", variant="stop", elem_id="fit-cancel-btn")
                status = gr.Markdown(elem_id="fit-status", elem_classes=["status-line"])

    def load_upload(path):
        if not path:
            return gr.skip()
        try:
            data = Path(path).read_bytes()
            if len(data) > APP.max_fit_chars:
                raise FusionError(f"{Path(path).name} is larger than {APP.max_fit_chars} bytes")
            return data.decode("utf-8")
        except (UnicodeDecodeError, FusionError, OSError) as exc:
            gr.Warning(f"{Path(path).name}: not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else str(exc))
            return gr.skip()

    def on_method(name_):
        spec = panel.methods.get(name_ or "", {})
        return [gr.update(visible=not spec.get("fit_from_scratch", False))] + panel.updates(name_)

    def run_fit(data: dict, request: gr.Request, progress=gr.Progress()):
        method_name, save_as = data[method], (data[name] or "").strip()
        flag = studio.flags.start(request, "fit")
        start = time.perf_counter()
        try:
            if not save_as:
                raise FusionError("give the fit a name under 'Save as' (letters, digits, '-', '_' or '.')")
            if not (data[examples] or "").strip():
                raise FusionError("paste or upload some JSONL examples first")
            options = train_options(data[epochs], data[lr], data[batch], data[max_steps])
            check_free_name(engine, save_as, bool(data[overwrite]), method_name)
            spec = panel.methods.get(method_name or "", {})
            chosen_list = [] if spec.get("fit_from_scratch") else parse_adapters(data[adapters])
            progress(0, desc="preparing…")
            yield "preparing…", gr.skip()
            for kind, payload in fit_in_background(
                engine,
                method_name,
                chosen_list,
                data[examples],
                panel.collect(method_name, data),
                options,
                save_as,
                bool(data[overwrite]),
                flag,
            ):
                if kind == "progress":
                    p = payload
                    progress(p.step / max(1, p.total_steps), desc=f"step {p.step}/{p.total_steps}")
                    stopping = " · stopping after this step…" if flag.is_set() else ""
                    yield (
                        f"step {p.step}/{p.total_steps} · loss {p.loss:.4f} · {p.seconds:.0f} s{stopping}",
                        plots.loss_figure(list(p.losses), p.total_steps),
                    )
                elif kind == "done":
                    losses = payload.meta.get("losses") or []
                    yield (
                        finished_line(payload, time.perf_counter() - start),
                        (plots.loss_figure(losses) if losses else gr.skip()),
                    )
                elif kind == "cancelled":
                    yield f"Cancelled after {time.perf_counter() - start:.0f} s: nothing was saved.", gr.skip()
                else:
                    raise FusionError(payload)
        except Exception as exc:
            line = error_line(exc)
            gr.Warning(line, duration=TOAST_SECONDS)
            yield f"⚠ {line}", gr.skip()
        finally:
            studio.flags.finish(request, "fit", flag)

    def cancel_fit(request: gr.Request):
        if studio.flags.cancel(request, "fit"):
            return "Stopping after the current step… nothing will be saved."
        return gr.skip()

    upload.upload(load_upload, upload, examples, api_visibility="private")
    method.change(on_method, method, [adapters, panel.note] + panel.components, api_visibility="private", queue=False)
    studio.pickers.adapters.append(adapters)
    fit_event = train.click(
        run_fit,
        {examples, method, adapters, name, overwrite, epochs, lr, batch, max_steps, *panel.components},
        [status, loss],
        api_visibility="private",
        show_progress_on=[status],
        concurrency_limit=1,
        concurrency_id="fit",
    )
    cancel.click(cancel_fit, None, status, api_visibility="private", queue=False)
    return {"event": fit_event, "status": status}
