"""The web app's named API endpoints through gradio_client, plus the figures and controls behind
the UI (no browser). The app runs on the real embedded base model with random LoRAs."""

from __future__ import annotations

import json

import pytest
import torch
from app_fixtures import LAYERS, MIXLORA, app_engine, app_url  # noqa: F401  (fixtures)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore:.*(no_silent_downcasting|copy keyword)")

EXAMPLES = "\n".join(
    json.dumps({"prompt": f"¿Cuánto es {a} + {b}?", "response": f"{a} + {b} = {a + b}."}) for a, b in [(3, 4), (10, 5)]
)


@pytest.fixture(scope="module")
def client(app_url):
    from gradio_client import Client

    return Client(app_url, verbose=False)


def api_error(client, *args, api_name):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as info:
        client.predict(*args, api_name=api_name)
    message = str(info.value)
    assert "Traceback" not in message and "\n" not in message.strip()
    return message


# ---- endpoints --------------------------------------------------------------------------------------
def test_endpoints_are_named(client):
    named = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert {"/methods", "/adapters", "/generate", "/compare", "/fit"} <= set(named)


def test_methods_lists_declared_params(client):
    methods = {m["name"]: m for m in client.predict(api_name="/methods")}
    assert {"base", "linear", "ties", "cat", "lorahub", "lora_flow"} <= set(methods)
    assert methods["lora_flow"]["fittable"] and methods["lora_flow"]["kind"] == "dynamic"
    assert {p["name"] for p in methods["lora_flow"]["params"]} == {"gates", "temperature"}


def test_adapters_lists_library_with_roles(client):
    library = client.predict(api_name="/adapters")
    roles = {a["name"]: a["role"] for a in library["adapters"] if a["kind"] == "lora"}
    assert roles == {"lang-es": "language", "lang-ru": "language", "task-math": "task", "task-code": "task"}
    assert library["errors"] == {}


def test_generate_lora_flow_returns_text_and_trace_summary(client):
    out = client.predict(
        ["lang-es", "task-math"], "lora_flow", '{"temperature": 1.0}', "What is 2 + 3?", 4, 0.0, api_name="/generate"
    )
    assert isinstance(out["text"], str) and out["text"]
    assert out["method"] == "lora_flow" and out["adapters"] == ["lang-es", "task-math"]
    trace = out["trace"]
    assert trace["kind"] == "gate" and trace["slot_names"] == ["lang-es", "task-math"]
    tokens, layers, slots = trace["shape"]
    assert (layers, slots) == (LAYERS, 2)
    assert tokens == out["prompt_tokens"] + out["new_tokens"]


def test_generate_takes_a_comma_separated_adapter_string(client):
    out = client.predict("lang-ru, task-code", "linear", "", "Hi", 2, 0.0, api_name="/generate")
    assert out["adapters"] == ["lang-ru", "task-code"]
    assert out["trace"]["kind"] == "static" and out["trace"]["shape"][1:] == [LAYERS, 2]


def test_generate_mixlora_traces_the_router(client):
    names = {m["name"] for m in client.predict(api_name="/methods")}
    if "mixlora" not in names:
        pytest.skip("the engine has no mixlora method")
    out = client.predict(MIXLORA, "mixlora", "{}", "Hi", 2, 0.0, api_name="/generate")
    assert out["trace"]["kind"] == "router" and out["trace"]["shape"][1:] == [LAYERS, 4]


@pytest.mark.parametrize(
    "args, expected",
    [
        (("lang-es", "no_such_method", "{}", "Hi", 2, 0.0), "unknown fusion method"),
        (("lang-es", "lora_flow", "{}", "Hi", 2, 0.0), "at least 2"),
        (("lang-es,task-math", "lora_flow", "{not json", "Hi", 2, 0.0), "JSON object"),
        (("lang-es,task-math", "lora_flow", '{"temperature": 99}', "Hi", 2, 0.0), "temperature"),
        (("lang-es,nope", "linear", "{}", "Hi", 2, 0.0), "nope"),
        (("lang-es,task-math", "linear", "{}", "   ", 2, 0.0), "empty"),
    ],
)
def test_generate_reports_user_errors_in_one_line(client, args, expected):
    assert expected in api_error(client, *args, api_name="/generate")


def test_compare_runs_columns_together_and_isolates_a_bad_column(client):
    columns = [
        {"method": "lora_flow", "adapters": ["lang-es", "task-math"]},
        {"method": "linear", "adapters": "lang-es,task-math", "params": {"weights": [0.5, 0.5]}},
        {"method": "lora_flow", "adapters": ["lang-es"]},
    ]
    results = client.predict("What is 2 + 2?", json.dumps(columns), 3, 0.0, api_name="/compare")
    assert len(results) == 3
    for result, kind in zip(results[:2], ("gate", "static")):
        assert result["error"] is None and result["text"]
        assert result["seconds_to_first_token"] is not None
        assert result["trace"]["kind"] == kind and result["trace"]["shape"][1] == LAYERS
    assert "at least 2" in results[2]["error"] and results[2]["trace"] is None
    assert "JSON list" in api_error(client, "Hi", "{}", 3, 0.0, api_name="/compare")


# ---- one batch for every request: Compare's columns decode together; a full batch queues -----------
BATCH_PROMPT = "Tell me a story about a lighthouse keeper."
BATCH_COLUMNS = [
    {"method": "lora_flow", "adapters": ["lang-es", "task-math"]},
    {"method": "linear", "adapters": ["lang-ru", "task-code"], "params": {"weights": [0.6, 0.8]}},
    {"method": "base", "adapters": []},
]
BATCH_TOKENS = 16


def column_requests_of(columns):
    from ui.choices import build_request

    return [build_request(c["method"], c["adapters"], c.get("params"), None) for c in columns]


def solo_replies(engine, requests):
    """Each request alone (nothing else in the engine's batch): the reference for greedy text."""
    from fusion.api import Sampling

    return [engine.generate(r, BATCH_PROMPT, Sampling(max_new_tokens=BATCH_TOKENS)) for r in requests]


def test_compare_columns_decode_together_in_one_batch(client, app_engine):
    from collections import Counter

    solo = solo_replies(app_engine, column_requests_of(BATCH_COLUMNS))
    assert all(len(e.token_ids) >= 4 for e in solo)  # long enough for the three to meet
    scheduler = app_engine.scheduler
    before = Counter(scheduler.rows_per_step)
    results = client.predict(BATCH_PROMPT, json.dumps(BATCH_COLUMNS), BATCH_TOKENS, 0.0, api_name="/compare")
    steps = Counter(scheduler.rows_per_step)
    steps.subtract(before)
    assert [r["error"] for r in results] == [None] * 3
    assert [r["text"] for r in results] == [e.text for e in solo]
    rows = sum(len(e.token_ids) for e in solo)
    assert steps[3] > 0, dict(steps)  # forwards that decoded all three columns at once
    assert sum(steps.values()) < rows, dict(steps)  # fewer forwards than a column-by-column run needs


def test_a_full_batch_shows_queued_columns_then_their_replies(app_engine, monkeypatch):
    """With room for one row, two of three columns wait: their status says so (not an error) until
    they stream, and every reply equals its solo run."""
    import threading
    from collections import Counter

    from fusion.api import GenerationEvent, Sampling, event_from_dict, event_to_dict
    from ui.side_by_side import run_side_by_side, stats_text

    requests = column_requests_of(BATCH_COLUMNS)
    solo = solo_replies(app_engine, requests)
    scheduler = app_engine.scheduler
    monkeypatch.setattr(scheduler, "max_rows", 1)
    before = Counter(scheduler.rows_per_step)
    shown = []  # each column's status lines, in order
    for results in run_side_by_side(
        app_engine, requests, BATCH_PROMPT, Sampling(max_new_tokens=BATCH_TOKENS), None, threading.Event()
    ):
        shown.append([stats_text(r) for r in results])
        final = [(r.text, r.error) for r in results]
    assert final == [(e.text, None) for e in solo]
    lines = [line for step in shown for line in step]
    assert any(line.endswith("busy, queued (position 2)…") for line in lines), lines
    waited = [i for i in range(3) if any("queued (position 1)" in step[i] for step in shown)]
    assert len(waited) == 2, lines
    for i in waited:  # queued, then streaming, then finished: never an error
        states = [("queued" in step[i], "first token" in step[i]) for step in shown]
        first_queued = states.index((True, False))
        assert (False, True) in states[first_queued:] and not states[-1][0]
        assert not any(step[i].startswith("⚠") for step in shown)
    steps = Counter(scheduler.rows_per_step)
    steps.subtract(before)
    assert {k for k, v in steps.items() if v} == {1}  # the cap held: one row a step
    # The wire format between replicas and their clients carries the place in the queue.
    assert event_from_dict(event_to_dict(GenerationEvent("", "", queued=2), False)).queued == 2


def test_fit_saves_a_fusion_that_generate_can_use(client):
    saved = client.predict(
        "lora_flow", ["lang-es", "task-math"], EXAMPLES, "api-gates", "{}", 1, 0.0, 2, 1, False, api_name="/fit"
    )
    assert saved["name"] == "api-gates" and saved["method"] == "lora_flow" and len(saved["losses"]) == 1
    assert "api-gates" in {f["name"] for f in client.predict(api_name="/adapters")["fusions"]}
    out = client.predict("", "base", "{}", "Hi", 2, 0.0, "api-gates", api_name="/generate")
    assert out["method"] == "lora_flow" and out["trace"]["slot_names"] == ["lang-es", "task-math"]
    assert "already" in api_error(
        client, "lora_flow", "lang-es,task-math", EXAMPLES, "api-gates", "{}", 1, 0.0, 2, 1, False, api_name="/fit"
    )
    assert "save_as" in api_error(client, "lora_flow", "lang-es,task-math", EXAMPLES, "", api_name="/fit")
    assert "line 1" in api_error(client, "lora_flow", "lang-es,task-math", "not json", "x", api_name="/fit")


def test_a_cancelled_fit_is_not_saved_a_finished_one_is_and_can_be_deleted(app_engine):
    import threading

    from fusion.errors import FusionError
    from ui.fit import fit_in_background

    train = {"max_steps": 2, "batch_size": 1}
    cancelled = threading.Event()
    cancelled.set()  # Cancel pressed (or the page closed) before the first step ended
    events = list(
        fit_in_background(
            app_engine, "lora_flow", ["lang-es", "task-math"], EXAMPLES, {}, train, "ui-cancelled", False, cancelled
        )
    )
    assert events[-1] == ("cancelled", None)
    assert "ui-cancelled" not in {f["name"] for f in app_engine.fusions()}
    assert not (app_engine.library.fusions_dir / "ui-cancelled").exists()
    kind, artifact = list(
        fit_in_background(
            app_engine,
            "lora_flow",
            ["lang-es", "task-math"],
            EXAMPLES,
            {},
            train,
            "ui-cancelled",
            False,
            threading.Event(),
        )
    )[-1]
    try:
        assert kind == "done" and artifact.name == "ui-cancelled" and len(artifact.meta["losses"]) == 2
        assert "ui-cancelled" in {f["name"] for f in app_engine.fusions()}  # the name was still free
        with pytest.raises(FusionError, match=r"is used by the saved fusions? (.*, )?ui-cancelled(, .*)?; delete"):
            app_engine.remove("lang-es", "adapter")
        app_engine.remove("ui-cancelled", "fusion")
        assert "ui-cancelled" not in {f["name"] for f in app_engine.fusions()}
        assert not list(app_engine.library.fusions_dir.glob("*ui-cancelled*"))
        with pytest.raises(FusionError, match="no fusion named 'ui-cancelled'"):
            app_engine.remove("ui-cancelled", "fusion")
    finally:
        import shutil

        shutil.rmtree(app_engine.library.fusions_dir / "ui-cancelled", ignore_errors=True)
        app_engine.library.rescan()


def test_a_fit_from_scratch_is_saved_as_an_adapter_unless_cancelled(app_engine):
    import shutil
    import threading
    from pathlib import Path

    from fusion.api import FusionRequest, RequestInfo
    from ui.fit import fit_in_background

    folder = Path(app_engine.library_folders().adapters) / "ui-mix"
    train = {"max_steps": 1, "batch_size": 1}
    cancelled = threading.Event()
    cancelled.set()
    events = list(fit_in_background(app_engine, "mixlora", [], EXAMPLES, {}, train, "ui-mix", False, cancelled))
    assert events[-1] == ("cancelled", None)
    assert "ui-mix" not in {a["name"] for a in app_engine.adapters()} and not folder.exists()
    try:
        kind, artifact = list(
            fit_in_background(app_engine, "mixlora", [], EXAMPLES, {}, train, "ui-mix", False, threading.Event())
        )[-1]
        assert kind == "done", artifact
        assert artifact.name == "ui-mix" and artifact.adapters == ["ui-mix"] and artifact.path == str(folder)
        assert len(artifact.meta["losses"]) == 1
        assert {a["name"]: a["kind"] for a in app_engine.adapters()}["ui-mix"] == "mixlora"
        request = FusionRequest(["ui-mix"], "mixlora")
        assert app_engine.describe(request) == RequestInfo("mixlora", ["ui-mix"], None)
        ids = torch.tensor([app_engine.encode_messages("Hi")])
        logits, run = app_engine.logits(request, ids, record=True)
        assert logits.shape[:2] == ids.shape and torch.isfinite(logits).all()
        assert len(run.router_steps) == 1 and sorted(run.router_steps[0]) == list(range(LAYERS))  # routed everywhere
        kind, line = list(
            fit_in_background(app_engine, "mixlora", [], EXAMPLES, {}, train, "ui-mix", False, threading.Event())
        )[-1]
        assert kind == "error" and "already exists" in line
        app_engine.remove("ui-mix", "adapter")
        assert "ui-mix" not in {a["name"] for a in app_engine.adapters()} and not folder.exists()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        app_engine.rescan()


def test_the_ui_reaches_the_engine_through_backend_operations_only():
    """app.py and ui/ call nothing on an engine beyond `Backend`, so a remote one serves them the
    same; only app.py names the two implementations."""
    import ast
    from pathlib import Path

    from fusion.api import Backend

    operations = {name for name, value in vars(Backend).items() if callable(value) and not name.startswith("_")}
    root = Path(__file__).resolve().parent.parent
    used, importers = {}, set()
    for path in [root / "app.py", *sorted((root / "ui").glob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            owner = getattr(node, "value", None) if isinstance(node, ast.Attribute) else None
            if (isinstance(owner, ast.Name) and owner.id == "engine") or (
                isinstance(owner, ast.Attribute) and owner.attr == "engine"
            ):
                used.setdefault(node.attr, set()).add(path.name)
            if isinstance(node, ast.ImportFrom) and node.module in ("fusion.engine", "fusion.remote"):
                importers.add(path.name)
    assert {"stream", "generate", "fit", "describe", "base_info", "remove", "import_adapter"} <= set(used)
    assert {name: files for name, files in used.items() if name not in operations} == {}
    assert importers == {"app.py"}


def test_the_engine_imports_neither_the_ui_nor_the_lab():
    """The folders are the layers: fusion/ (the engine) never imports gradio, ui/, app or lab/."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    upward = {}
    for path in sorted((root / "fusion").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom) and node.level == 0
                else []
            )
            for name in names:
                if name.split(".")[0] in ("gradio", "ui", "app", "lab"):
                    upward.setdefault(str(path.relative_to(root)), []).append(name)
    assert upward == {}
    assert (root / "fusion" / "math_data.py").is_file() and not list((root / "fusion").glob("lab/*.py"))


# ---- figures (fusion/plots.py) ---------------------------------------------------------------------
def make_trace(kind="gate", slots=("lang-es", "task-math"), tokens=7, prompt=4, layers=3, **extra):
    from fusion.trace import Trace

    torch.manual_seed(0)
    weights = torch.rand(tokens, layers, len(slots))
    return Trace(weights, [f"t{i}" for i in range(tokens)], list(slots), kind, "m", prompt, **extra)


def test_gate_heatmap_has_one_row_per_layer_and_exact_hover():
    from fusion import plots

    trace = make_trace()
    figure = plots.heatmap(trace, plots.VIEW_ALL)
    data = figure.data[0]
    assert len(data.z) == 3 and len(data.z[0]) == 7
    expected = float(trace.weights[5, 2, 1] - trace.weights[5, 2, 0])
    assert data.z[2][5] == pytest.approx(expected)
    assert f"{float(trace.weights[5, 2, 0]):.4f}" in data.text[2][5] and "layer 2" in data.text[2][5]
    assert data.zmid == 0  # diverging around "equal weight"
    assert len(plots.heatmap(trace, plots.VIEW_REPLY).data[0].z[0]) == 3
    assert len(plots.heatmap(trace, plots.VIEW_TAIL, prompt_tail=2).data[0].z[0]) == 5
    one_slot = plots.heatmap(trace, plots.VIEW_ALL, slot="lang-es").data[0]
    assert one_slot.z[1][0] == pytest.approx(float(trace.weights[0, 1, 0]))


def test_three_slots_pick_a_slot_and_router_colours_the_top_expert():
    from fusion import plots

    gate = make_trace(slots=("a", "b", "c"))
    assert plots.slot_options(gate) == ["a", "b", "c"] and plots.default_slot(gate) == "c"
    router = make_trace("router", slots=("e0", "e1", "e2", "e3"), chosen=torch.zeros(7, 3, 2, dtype=torch.long))
    data = plots.heatmap(router, plots.VIEW_ALL).data[0]
    assert data.z[0][0] == float(router.weights[0, 0].argmax())
    assert "top-k: e0, e0" in data.text[0][0] and list(data.colorbar.ticktext) == ["e0", "e1", "e2", "e3"]


def test_static_heatmap_shows_layers_by_adapter_and_modules():
    from fusion import plots

    static = make_trace("static", module_weights={"q_proj": torch.ones(3, 2)})
    figure = plots.heatmap(static, module="q_proj")
    assert len(figure.data[0].z) == 3 and list(figure.data[0].x) == ["lang-es", "task-math"]
    assert figure.data[0].z[0][0] == 1.0
    assert plots.module_options(static) == [plots.MEAN_MODULE, "q_proj"]
    assert plots.heatmap(make_trace("static", slots=())).data == ()


def test_colour_scales_fit_each_kind_of_weight():
    from fusion import plots

    static = make_trace("static")  # weights in [0, 1): sequential from 0, not centred on 0
    data = plots.heatmap(static).data[0]
    assert (data.zmin, data.zmax, data.zmid) == (0.0, 1.0, None) and data.texttemplate == "%{z:.2f}"
    negated = make_trace("static")
    negated.weights[..., 0] *= -1  # a negated task vector: the sign matters
    data = plots.heatmap(negated).data[0]
    assert data.zmid == 0 and data.zmin == -data.zmax
    tall = make_trace("static", layers=30)
    assert plots.heatmap(tall).data[0].texttemplate is None  # 30 rows: values in hover only
    router = make_trace("router", slots=("e0", "e1", "e2"), chosen=torch.zeros(7, 3, 2, dtype=torch.long))
    data = plots.heatmap(router, plots.VIEW_ALL, slot="e1").data[0]
    assert (data.zmin, data.zmax) == (0.0, 1.0)


def test_token_scores_cover_the_reply_within_minus_one_to_one():
    from fusion import plots

    trace = make_trace()
    trace.weights[:, :, 1] += 5.0
    scores = plots.token_scores(trace, layer=None)
    assert [token for token, _ in scores] == ["t4", "t5", "t6"]
    assert all(-1.0 <= score <= 1.0 for _, score in scores) and scores[0][1] == 1.0
    short = make_trace()
    short.weights = short.weights[:-1]  # fewer weight rows than tokens still draws
    assert len(plots.heatmap(short, plots.VIEW_ALL).data[0].z[0]) == 6


# ---- what the pickers choose and refuse ----------------------------------------------------------
def test_a_method_gets_the_adapters_it_can_take(app_engine):
    from ui.choices import adapters_for

    pair = ["lang-es", "task-math"]
    if "mixlora" in {m["name"] for m in app_engine.methods()}:
        assert adapters_for(app_engine, "mixlora", pair, pair) == [MIXLORA]
        assert adapters_for(app_engine, "lora_flow", [MIXLORA], pair) == pair  # back to the default pair
    assert adapters_for(app_engine, "single", pair, pair) == ["task-math"]  # the task LoRA, alone
    assert adapters_for(app_engine, "lora_flow", ["task-code"], pair) == ["lang-es", "task-code"]  # slot order
    assert adapters_for(app_engine, "linear", ["lang-ru", "task-code", "task-math"], pair) == [
        "lang-ru",
        "task-code",
        "task-math",
    ]  # a valid choice is kept as it is
    assert adapters_for(app_engine, "base", pair, pair) == pair


def test_a_choice_the_method_cannot_run_says_what_to_do(app_engine):
    from fusion.errors import FusionError
    from ui.choices import build_request, check_choice

    def refusal(method, adapters):
        with pytest.raises(FusionError) as info:
            check_choice(app_engine, build_request(method, adapters, {}))
        return str(info.value)

    if "mixlora" in {m["name"] for m in app_engine.methods()}:
        assert refusal("mixlora", ["lang-es", "task-math"]) == (
            f"MixLoRA (LoRA experts) needs exactly one mixlora adapter such as {MIXLORA}: pick it under More "
            "LoRAs and set the language and task pickers to (none)"
        )
        assert "is a mixlora adapter: remove it from More LoRAs" in refusal("linear", ["lang-es", MIXLORA])
    assert refusal("single", ["lang-es", "task-math"]) == (
        "Single LoRA applies 1 LoRA, got 2: set the language or the task picker to (none)"
    )
    assert refusal("lora_flow", ["task-math"]) == (
        "LoRA-Flow (dynamic gates) needs at least 2 LoRAs, got 1: pick a language and a task LoRA"
    )
    check_choice(app_engine, build_request("lora_flow", "lang-es, task-math", "{}"))  # runnable: no refusal
    check_choice(app_engine, build_request("", "", {}, fusion="any-saved-fusion"))  # a fusion brings its own


def test_one_request_builder_for_tabs_and_endpoints(app_engine):
    from fusion.engine import FusionRequest
    from ui.choices import build_request, request_label

    assert build_request("linear", "lang-es, task-code", '{"weights": [1, 2]}') == FusionRequest(
        ["lang-es", "task-code"], "linear", {"weights": [1, 2]}
    )
    # A saved fusion brings method and adapters; params given apply on top of its own.
    assert build_request("linear", ["lang-es"], {"temperature": 2.0}, "es-gates") == FusionRequest(
        fusion="es-gates", params={"temperature": 2.0}
    )
    assert build_request("linear", ["lang-es"], {}, "(none)").fusion is None
    assert request_label(app_engine, build_request("linear", ["lang-es", "task-code"], {})) == (
        "linear · lang-es + task-code"
    )
    assert request_label(app_engine, build_request("base", ["lang-es"], {})) == "base"


# ---- controls and start-up --------------------------------------------------------------------------
def test_param_panel_builds_controls_from_declarations(app_engine):
    from ui.common import ParamPanel, control_kind

    declared = {m["name"]: {p["name"]: p for p in m["params"]} for m in app_engine.methods()}
    assert control_kind(declared["ties"]["density"]) == "slider"
    assert control_kind(declared["ties"]["majority_sign_method"]) == "dropdown"
    assert control_kind(declared["linear"]["weights"]) == "textbox"
    assert control_kind(declared["lora_flow"]["temperature"]) == "textbox"  # empty = the gates' own
    panel = ParamPanel(app_engine, "t")
    assert panel.size >= max(len([p for p in m.values() if not p["fit_only"]]) for m in declared.values())
    assert ParamPanel(app_engine, "f", for_fit=True).size >= max(len(m) for m in declared.values())
    values = [None] * (panel.size * 5)
    values[0 * 5 + 4], values[1 * 5 + 1], values[2 * 5 + 3] = "0.3, 0.7", 0.25, "frequency"
    assert panel.collect("ties", values) == {
        "weights": "0.3, 0.7",
        "density": 0.25,
        "majority_sign_method": "frequency",
    }


def test_fit_only_params_show_in_the_fit_tab_only(app_engine):
    from ui.common import ParamPanel

    declared = [p["name"] for m in app_engine.methods() if m["name"] == "mixlora" for p in m["params"]]
    assert {"num_experts", "r", "seed"} <= set(declared)
    chat, fit = ParamPanel(app_engine, "c"), ParamPanel(app_engine, "f", for_fit=True)
    assert [p["name"] for p in chat.methods["mixlora"]["params"]] == ["top_k"]
    assert [p["name"] for p in fit.methods["mixlora"]["params"]] == declared
    values = [None] * (chat.size * 5)
    values[0 * 5 + 4] = "1"  # the first control is top_k in the chat panel
    assert chat.collect("mixlora", values) == {"top_k": "1"}


def test_exposed_binding_without_auth_warns():
    from app import parse_auth, security_warnings

    assert security_warnings("127.0.0.1", False, None) == []
    assert any("--auth" in w for w in security_warnings("0.0.0.0", False, None))
    assert any("public link" in w for w in security_warnings("127.0.0.1", True, None))
    assert security_warnings("0.0.0.0", True, "me:secret") == []
    assert parse_auth("me:secret") == ("me", "secret")
    with pytest.raises(SystemExit):
        parse_auth("no-colon")


def test_device_and_dtype_default_to_the_best_available():
    from app import parse_args, resolved_dtype

    args = parse_args([])
    assert (args.device, args.dtype) == ("auto", "auto")
    assert resolved_dtype("auto", "auto") == ("bfloat16" if torch.cuda.is_available() else "float32")
    assert resolved_dtype("cpu", "auto") == "float32"
    assert resolved_dtype("cpu", "float16") == "float16"  # an explicit choice is kept


def test_scoring_answers_every_problem_of_every_column_in_shared_batches(app_engine):
    """The Compare tab's scoring: each column's count equals its problems answered one at a time
    (problems whose expected value is set from those solo replies, so that some are right and some
    wrong), the answers share forwards, a column whose request failed shows its error."""
    import dataclasses
    import threading
    from collections import Counter

    from fusion.api import Sampling
    from fusion.errors import FusionError
    from fusion.math_data import eval_examples
    from fusion.math_scoring import final_number
    from ui.side_by_side import score_columns

    requests = column_requests_of(BATCH_COLUMNS[:2]) + [FusionError("adapter 'nope' is not in the library")]
    sampling = Sampling(max_new_tokens=12)
    problems = eval_examples("es", 4)
    solo = [[app_engine.generate(r, p.question, sampling, trace=False).text for p in problems] for r in requests[:2]]
    # Problem i's expected value: column 0's solo final number for even i, a number no reply ends on otherwise.
    values = [int(final_number(solo[0][i]) or 0) if i % 2 == 0 else 987654 for i in range(len(problems))]
    problems = [dataclasses.replace(p, value=v) for p, v in zip(problems, values)]
    expected = [sum(final_number(t) == v for t, v in zip(texts, values)) for texts in solo]
    before = Counter(app_engine.scheduler.rows_per_step)
    seen = []
    rows = score_columns(app_engine, requests, problems, sampling, threading.Event(), lambda d, t: seen.append((d, t)))
    assert [row[1] for row in rows[:2]] == expected
    assert rows[0][1] == sum(final_number(t) is not None for t in solo[0][::2])
    assert [row[2] for row in rows] == [4, 4, 4] and rows[0][3] == f"{expected[0] / 4:.0%}"
    assert rows[2][1] is None and "nope" in rows[2][3]
    assert seen == [(d, 8) for d in range(1, 9)]
    steps = Counter(app_engine.scheduler.rows_per_step)
    steps.subtract(before)
    assert max(k for k, v in steps.items() if v > 0) > 1, dict(steps)  # answers decoded together
