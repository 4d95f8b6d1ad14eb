"""What the tabs share: choices from the library, the generic parameter panel, cancel flags,
request building and error lines. Nothing here holds a per-user choice."""

from __future__ import annotations

import atexit
import json
import logging
import math
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr

from fusion.engine import Engine, FusionRequest
from fusion.errors import FusionError

from .constants import APP, NONE, PREFERRED

log = logging.getLogger("lora_studio.app")


def error_line(exc: BaseException) -> str:
    """One readable sentence for the UI; unexpected errors are logged with their stack trace."""
    if isinstance(exc, FusionError):
        return str(exc)
    log.exception("unexpected error", exc_info=exc)
    return f"unexpected error ({type(exc).__name__}: {exc}); the server log has the details"


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


def make_request(engine: Engine, method: str, adapters: list[str], params: dict,
                 fusion: str | None = None) -> FusionRequest:
    """A saved fusion brings its own method and adapters; the panel's params then only apply
    when the method picker shows that same method."""
    if fusion and fusion != NONE:
        saved = {f["name"]: f["method"] for f in engine.fusions()}.get(fusion)
        return FusionRequest(fusion=fusion, params=params if saved == method else {})
    return FusionRequest(adapters=adapters, method=method or "base", params=params)


def describe_fusion(engine: Engine, name: str | None) -> str:
    if not name or name == NONE:
        return ""
    for f in engine.fusions():
        if f["name"] == name:
            return (f"Saved fusion **{name}** uses its own method (`{f['method']}`) and adapters "
                    f"({', '.join(f['adapters']) or 'none'}); the pickers above are ignored.")
    return f"Saved fusion **{name}** is no longer in the library."


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

    def build(self, method: str | None) -> "ParamPanel":
        """Create the note and the pool, set up for `method` (no round trip on page load)."""
        first = self.updates(method)
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

    def updates(self, method: str | None) -> list[dict]:
        """gr.update()s for the note and every pool control, in `components` order."""
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

    def collect(self, method: str | None, values: list) -> dict:
        """The chosen method's params from the pool's values (empty means: the declared default)."""
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
        json_path.write_text(trace.to_json(), encoding="utf-8")
        csv_path.write_text(trace.to_csv(), encoding="utf-8")
        return str(json_path), str(csv_path)


CSS = """
.param-note p { font-size: 0.85em; color: var(--body-text-color-subdued); margin: 0; }
#stats-line p, .stats-line p { font-size: 0.85em; color: var(--body-text-color-subdued); margin: 0; }
#chat-status p, .status-line p { margin: 0; }
.compare-out { min-height: 6em; }
footer { display: none !important; }
"""


def theme():
    return gr.themes.Soft(primary_hue="indigo", secondary_hue="orange")
