"""What the tabs share: choices from the library, the generic parameter panel, cancel flags,
request building and error lines. Nothing here holds a per-user choice."""

from __future__ import annotations

import atexit
import json
import logging
import math
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr

from fusion import plots
from fusion.engine import Engine, FusionRequest
from fusion.errors import FusionError

from .constants import APP, NONE, PREFERRED

log = logging.getLogger("lora_studio.app")
TOAST_SECONDS = 4  # the status line keeps the message; a toast that lingers only stacks over the buttons


# An absolute path: a slash not inside a word or a relative path, folders, then the last name.
_ABSOLUTE_PATH = re.compile(r"(?<![\w.~])/(?:[^\s/'\"]+/)+([^\s/'\"]+)")


def short_paths(text: str) -> str:
    """Server folders are the server's business: name a file or folder by its last part."""
    return _ABSOLUTE_PATH.sub(r"\1", text)


def error_line(exc: BaseException) -> str:
    """One readable sentence for the UI; unexpected errors are logged with their stack trace."""
    if isinstance(exc, FusionError):
        return short_paths(str(exc))
    log.exception("unexpected error", exc_info=exc)
    return short_paths(f"unexpected error ({type(exc).__name__}: {exc}); the server log has the details")


# ---- choices from the library ---------------------------------------------------------------
def adapter_choices(engine: Engine, role: str | None = None, with_none: bool = False) -> list:
    """(label, name) pairs; `role` filters, "(none)" first when asked."""
    rows = [a for a in engine.adapters() if role is None or a["role"] == role]
    choices = [(NONE, NONE)] if with_none else []
    for a in rows:
        label = a["name"] if a.get("kind", "lora") == "lora" else f"{a['name']} ({a['kind']})"
        choices.append((label, a["name"]))
    return choices


def fusion_choices(engine: Engine) -> list:
    choices = [(NONE, NONE)]
    for f in engine.fusions():
        choices.append((f"{f['name']}  ·  {f['method']} over {' + '.join(f['adapters']) or 'new adapter'}", f["name"]))
    return choices


def method_choices(engine: Engine, fittable: bool = False) -> list:
    return [(m["pretty_name"] or m["name"], m["name"]) for m in engine.methods()
            if m["fittable"] or not fittable]


def preferred(choices: list, wanted: str | None, fallback_index: int | None = 0):
    names = [value for _, value in choices if value != NONE]
    if wanted in names:
        return wanted
    if fallback_index is None or not names:
        return NONE if any(v == NONE for _, v in choices) else None
    return names[min(fallback_index, len(names) - 1)]


def default_selection(engine: Engine) -> dict:
    """Sensible first choices: lang-es + task-math + LoRA-Flow when the library has them, with the
    fitted es-math-flow gates when shipped."""
    lang = preferred(adapter_choices(engine, "language", True), PREFERRED["language"])
    task = preferred(adapter_choices(engine, "task", True), PREFERRED["task"])
    chosen = [a for a in (lang, task) if a not in (None, NONE)]
    methods = {m["name"] for m in engine.methods()}
    method = (PREFERRED["method"] if len(chosen) == 2 and PREFERRED["method"] in methods else
              "single" if len(chosen) == 1 and "single" in methods else "base")
    fitted = f"{(lang or '').removeprefix('lang-')}-math-flow"  # the shipped gates for this pair, if fitted
    fusion = fitted if method == "lora_flow" and task == "task-math" and fitted in {f["name"] for f in engine.fusions()} else NONE
    return {"language": lang or NONE, "task": task or NONE, "adapters": chosen, "method": method, "fusion": fusion}


def parse_adapters(value) -> list[str]:
    """A list of names, or one comma-separated string."""
    if value is None:
        return []
    if isinstance(value, str):
        value = value.split(",")
    return [str(v).strip() for v in value if str(v).strip() and str(v).strip() != NONE]


def parse_params(text) -> dict:
    if isinstance(text, dict):
        return text
    if text is None or not str(text).strip():
        return {}
    try:
        params = json.loads(text)
    except json.JSONDecodeError as exc:
        raise FusionError(f"params must be a JSON object such as {{\"temperature\": 1.0}} ({exc.msg})") from None
    if not isinstance(params, dict):
        raise FusionError("params must be a JSON object such as {\"temperature\": 1.0}")
    return params


def build_request(method, adapters, params, fusion=None) -> FusionRequest:
    """The one way a tab or an endpoint turns its choices into a request.

    A saved fusion supplies its own method and adapters; `params` then apply on top of its
    fitted ones (the tabs show a fusion's own params when it is picked, so what is shown is what
    runs). `adapters` may be a list or comma-separated text, `params` a dict or JSON text.
    """
    params = parse_params(params)
    if fusion and fusion != NONE:
        return FusionRequest(fusion=str(fusion), params=params)
    return FusionRequest(adapters=parse_adapters(adapters), method=method or "base", params=params)


def request_label(engine: Engine, request: FusionRequest | Exception) -> str:
    """What produced a reply, as chat bubbles, status lines and compare columns name it:
    "es-math-flow (lora_flow) · lang-es + task-math" or "linear · lang-es + task-math"."""
    if isinstance(request, Exception):
        return "invalid choice"
    try:
        method, adapters, _ = engine.resolve(request)
    except Exception:  # the run itself reports the problem
        return request.fusion or request.method
    head = f"{request.fusion} ({method.name})" if request.fusion else method.name
    return f"{head} · {' + '.join(a.name for a in adapters)}" if adapters else head


def saved_fusion(engine: Engine, name: str | None) -> dict | None:
    """A saved fusion as the pickers should show it: method, adapters and the params it runs
    with (its fitted tensors named by the fusion itself, e.g. gates = "es-math-flow")."""
    if not name or name == NONE:
        return None
    for f in engine.fusions():
        if f["name"] == name:
            params = dict(f.get("params") or {})
            ref = (f.get("meta") or {}).get("param_ref")
            if ref:
                params[ref] = name
            return {"name": name, "method": f["method"], "adapters": list(f["adapters"]), "params": params}
    return None


def describe_fusion(engine: Engine, name: str | None) -> str:
    if not name or name == NONE:
        return ""
    fusion = saved_fusion(engine, name)
    if fusion is None:
        return f"Saved fusion **{name}** is no longer in the library."
    return (f"**{name}** runs `{fusion['method']}` over {', '.join(fusion['adapters']) or 'no adapter'} with its "
            "fitted weights, as the pickers show. Changing the method or an adapter leaves the fusion.")


def method_spec(engine: Engine, name: str | None) -> dict:
    return next((m for m in engine.methods() if m["name"] == name), {})


def adapters_for(engine: Engine, method: str | None, chosen: list[str], defaults: list[str]) -> list[str]:
    """The adapters a method can run with, starting from the chosen ones: of the kind it takes
    (a MixLoRA adapter for MixLoRA, LoRAs otherwise), no more than it takes (the last ones: the task
    LoRA for Single LoRA), and filled from `defaults` (then the library) when too few."""
    spec = method_spec(engine, method)
    if not spec or spec["name"] == "base":
        return chosen
    kind = spec.get("adapter_kind", "lora")
    library = engine.adapters()
    kinds = {a["name"]: a.get("kind", "lora") for a in library}
    kept = [a for a in chosen if kinds.get(a) == kind]
    most = spec.get("max_adapters")
    if most is not None and len(kept) > most:
        kept = kept[len(kept) - most:]
    wanted = max(1, spec.get("min_adapters") or 0)
    if len(kept) < wanted:
        roles = {a["name"]: a.get("role") for a in library}
        # A default of a role not yet chosen (the task LoRA first when one adapter is enough),
        # then anything of the right kind.
        preferred = list(reversed(defaults)) if most == 1 else list(defaults)
        for candidate in preferred + [a["name"] for a in library]:
            taken = {roles.get(a) for a in kept} - {"other"}
            if (len(kept) < wanted and kinds.get(candidate) == kind and candidate not in kept
                    and (candidate not in defaults or roles.get(candidate) not in taken)):
                kept.append(candidate)
        slot = {"language": 0, "task": 2}
        kept.sort(key=lambda a: slot.get(roles.get(a), 1))  # the slot order: language first, task last
    return kept


def check_choice(engine: Engine, request: FusionRequest) -> None:
    """Before running: an adapter count or kind the method cannot take, said with what to do."""
    if request.fusion:
        return
    spec = method_spec(engine, request.method)
    if not spec:
        return
    kinds = {a["name"]: a.get("kind", "lora") for a in engine.adapters()}
    kind, pretty = spec.get("adapter_kind", "lora"), spec.get("pretty_name") or spec["name"]
    if spec["name"] == "base":
        return
    if kind != "lora":
        offered = [name for name, k in kinds.items() if k == kind]
        example = f" such as {offered[0]}" if offered else " (the library has none: train one in the Fit tab)"
        if [a for a in request.adapters if kinds.get(a) == kind] != request.adapters or len(request.adapters) != 1:
            raise FusionError(f"{pretty} needs exactly one {kind} adapter{example}: pick it under More LoRAs "
                              "and set the language and task pickers to (none)")
        return
    odd = [a for a in request.adapters if kinds.get(a, "lora") != "lora"]
    if odd:
        raise FusionError(f"{pretty} fuses LoRAs, and {odd[0]} is a {kinds[odd[0]]} adapter: remove it from "
                          "More LoRAs or pick the method made for it")
    least, most = spec.get("min_adapters") or 0, spec.get("max_adapters")
    if most is not None and len(request.adapters) > most:
        raise FusionError(f"{pretty} applies {most} LoRA, got {len(request.adapters)}: set the language or the "
                          "task picker to (none)" if most == 1 else
                          f"{pretty} takes at most {most} LoRAs, got {len(request.adapters)}")
    if len(request.adapters) < least:
        raise FusionError(f"{pretty} needs at least {least} LoRAs, got {len(request.adapters)}: pick a language "
                          "and a task LoRA")


# ---- per-session cancel flags ------------------------------------------------------------------
class CancelFlags:
    """One threading.Event per (browser session, purpose); Stop sets it, the next run replaces it."""

    def __init__(self):
        self._flags: dict[tuple[str, str], threading.Event] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _key(request: gr.Request | None, purpose: str) -> tuple[str, str]:
        return (getattr(request, "session_hash", None) or "anonymous", purpose)

    def start(self, request: gr.Request | None, purpose: str) -> threading.Event:
        flag = threading.Event()
        with self._lock:
            self._flags[self._key(request, purpose)] = flag
        return flag

    def cancel(self, request: gr.Request | None, purpose: str) -> bool:
        with self._lock:
            flag = self._flags.get(self._key(request, purpose))
        if flag is None:
            return False
        flag.set()
        return True

    def finish(self, request: gr.Request | None, purpose: str, flag: threading.Event) -> None:
        with self._lock:
            if self._flags.get(self._key(request, purpose)) is flag:
                del self._flags[self._key(request, purpose)]


# ---- the generic parameter panel ------------------------------------------------------------------
def control_kind(param: dict) -> str:
    """Which generic control shows a declared parameter."""
    kind = param["type"]
    if kind in ("float", "int") and param.get("default") is None:
        return "textbox"  # empty means "the method decides"; a Number box cannot be empty
    if kind in ("float", "int"):
        low, high = param.get("min"), param.get("max")
        bounded = low is not None and high is not None and param.get("default") is not None
        if bounded and (kind == "float" or high - low <= 1000):
            return "slider"
        return "number"
    if kind == "bool":
        return "checkbox"
    if kind == "choice":
        return "dropdown"
    return "textbox"  # floats, text, artifact


KINDS = ("number", "slider", "checkbox", "dropdown", "textbox")


class ParamPanel:
    """A fixed pool of generic controls; a method's declared params decide which are shown.

    Adding a method needs no UI code: its `params` declaration is enough.
    """

    def __init__(self, engine: Engine, prefix: str, for_fit: bool = False):
        # Parameters that only shape a fit (a new adapter's experts, rank, seed...) are shown in
        # the Fit tab only.
        self.methods = {m["name"]: {**m, "params": [p for p in m["params"] if for_fit or not p.get("fit_only")]}
                        for m in engine.methods()}
        self.size = max([APP.min_param_controls] + [len(m["params"]) for m in self.methods.values()])
        self.prefix = prefix
        self.slots: list[dict[str, gr.components.Component]] = []
        self.note: gr.Markdown | None = None

    def build(self, method: str | None, values: dict | None = None) -> "ParamPanel":
        """Create the note and the pool, set up for `method` (no round trip on page load)."""
        first = self.updates(method, values)
        self.note = gr.Markdown(first[0]["value"], elem_classes=["param-note"])
        factories = {"number": gr.Number, "slider": gr.Slider, "checkbox": gr.Checkbox,
                     "dropdown": gr.Dropdown, "textbox": gr.Textbox}
        for i in range(self.size):
            slot = {}
            for j, kind in enumerate(KINDS):
                kwargs = {k: v for k, v in first[1 + i * len(KINDS) + j].items() if k != "__type__"}
                if kind == "dropdown":
                    kwargs.setdefault("choices", [])
                slot[kind] = factories[kind](elem_id=f"{self.prefix}-param-{i}-{kind}", **kwargs)
            self.slots.append(slot)
        return self

    @property
    def components(self) -> list:
        return [slot[kind] for slot in self.slots for kind in KINDS]

    def updates(self, method: str | None, values: dict | None = None) -> list[dict]:
        """gr.update()s for the note and every pool control, in `components` order; `values`
        (e.g. a saved fusion's params) replace the declared defaults."""
        spec = self.methods.get(method or "", {"params": [], "description": "", "reference_url": ""})
        params = spec["params"]
        note = spec.get("description", "")
        if spec.get("reference_url"):
            note += f" [paper]({spec['reference_url']})"
        out = [gr.update(value=note)]
        for i in range(self.size):
            param = params[i] if i < len(params) else None
            chosen = control_kind(param) if param else None
            for kind in KINDS:
                if kind != chosen:
                    out.append(gr.update(visible=False))
                    continue
                if values and param["name"] in values:
                    param = {**param, "default": values[param["name"]]}
                out.append(gr.update(**self._control(param, kind)))
        return out

    @staticmethod
    def _control(param: dict, kind: str) -> dict:
        label = param["name"].replace("_", " ")
        common = {"visible": True, "label": label, "info": param.get("help") or None}
        default = param.get("default")
        if kind == "slider":
            # A power of ten fine enough that the declared default lies on the slider's grid.
            span = param["max"] - param["min"]
            step = 1 if param["type"] == "int" else 10.0 ** math.floor(math.log10(span / 1000)) if span > 0 else 0.01
            return {**common, "minimum": param["min"], "maximum": param["max"], "value": default, "step": step}
        if kind == "number":
            return {**common, "value": default, "minimum": param.get("min"), "maximum": param.get("max"),
                    "precision": 0 if param["type"] == "int" else None}
        if kind == "checkbox":
            return {**common, "value": bool(default)}
        if kind == "dropdown":
            return {**common, "choices": list(param.get("choices") or []), "value": default}
        placeholder = {"floats": "comma-separated, one per adapter (empty = default)",
                       "artifact": "a saved fusion name or a path (empty = none)",
                       "float": "a number (empty = default)", "int": "a whole number (empty = default)"
                       }.get(param["type"], "")
        value = "" if default is None else (", ".join(map(str, default)) if isinstance(default, list) else str(default))
        return {**common, "value": value, "placeholder": placeholder}

    def collect(self, method: str | None, values: list | dict) -> dict:
        """The chosen method's params from the pool's values, given in `components` order or as
        a handler's inputs keyed by component (empty means: the declared default)."""
        if isinstance(values, dict):
            values = [values.get(c) for c in self.components]
        spec = self.methods.get(method or "")
        if spec is None:
            return {}
        params = {}
        for i, param in enumerate(spec["params"]):
            value = values[i * len(KINDS) + KINDS.index(control_kind(param))]
            if value is None or (isinstance(value, str) and not value.strip()):
                continue
            params[param["name"]] = value
        return params


# ---- shared app state --------------------------------------------------------------------------------
@dataclass
class Pickers:
    """Components whose choices come from the library, refreshed after a fit or an import."""

    language: list = field(default_factory=list)
    task: list = field(default_factory=list)
    adapters: list = field(default_factory=list)  # multiselects over every adapter
    fusions: list = field(default_factory=list)

    def components(self) -> list:
        return self.language + self.task + self.adapters + self.fusions

    def updates(self, engine: Engine) -> list:
        language = adapter_choices(engine, "language", True)
        task = adapter_choices(engine, "task", True)
        every = adapter_choices(engine)
        fusions = fusion_choices(engine)
        return ([gr.update(choices=language) for _ in self.language] + [gr.update(choices=task) for _ in self.task]
                + [gr.update(choices=every) for _ in self.adapters] + [gr.update(choices=fusions) for _ in self.fusions])


@dataclass
class Studio:
    """What every tab builder receives: the engine and the app-wide helpers."""

    engine: Engine
    flags: CancelFlags = field(default_factory=CancelFlags)
    pickers: Pickers = field(default_factory=Pickers)
    files: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="lora-studio-")))

    def __post_init__(self):
        atexit.register(shutil.rmtree, self.files, True)  # downloadable trace files live until exit

    def write_trace_files(self, trace, stem: str) -> tuple[str, str]:
        json_path, csv_path = self.files / f"{stem}.json", self.files / f"{stem}.csv"
        # readable_tokens: the tokens as text, split characters included (see plots.readable_tokens)
        data = {**trace.to_dict(), "readable_tokens": plots.readable_tokens(trace.tokens)}
        json_path.write_text(json.dumps(data), encoding="utf-8")
        csv_path.write_text(trace.to_csv(), encoding="utf-8")
        return str(json_path), str(csv_path)


CSS = """
.param-note p { font-size: 0.85em; color: var(--body-text-color-subdued); margin: 0; }
#stats-line p, .stats-line p { font-size: 0.85em; color: var(--body-text-color-subdued); margin: 0; }
#chat-status p, .status-line p { margin: 0; }
.compare-out { min-height: 6em; }
#trace-info { flex: 1 1 260px; min-width: 260px; }
#trace-info-row { flex-wrap: wrap; }
#chat-send-row { flex-wrap: wrap; }
footer { display: none !important; }
"""


def theme():
    return gr.themes.Soft(primary_hue="indigo", secondary_hue="orange")
