"""What the tabs share: the generic parameter panel, cancel flags, error lines and the app-wide
state (choices and requests are in `ui.choices`). Nothing here holds a per-user choice."""

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
from fusion.api import Backend
from fusion.errors import FusionError

from .choices import adapter_choices, fusion_choices, kind_choices
from .constants import APP

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


def queued_note(place: int) -> str:
    """What a request waiting for room in the engine's running batch shows: not an error."""
    return f"busy, queued (position {place})…"


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

    def __init__(self, engine: Backend, prefix: str, for_fit: bool = False):
        # Parameters that only shape a fit (a new adapter's experts, rank, seed...) are shown in
        # the Fit tab only.
        self.methods = {
            m["name"]: {**m, "params": [p for p in m["params"] if for_fit or not p.get("fit_only")]}
            for m in engine.methods()
        }
        self.size = max([APP.min_param_controls] + [len(m["params"]) for m in self.methods.values()])
        self.prefix = prefix
        self.slots: list[dict[str, gr.components.Component]] = []
        self.note: gr.Markdown | None = None

    def build(self, method: str | None, values: dict | None = None) -> ParamPanel:
        """Create the note and the pool, set up for `method` (no round trip on page load)."""
        first = self.updates(method, values)
        self.note = gr.Markdown(first[0]["value"], elem_classes=["param-note"])
        factories = {
            "number": gr.Number,
            "slider": gr.Slider,
            "checkbox": gr.Checkbox,
            "dropdown": gr.Dropdown,
            "textbox": gr.Textbox,
        }
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
            return {
                **common,
                "value": default,
                "minimum": param.get("min"),
                "maximum": param.get("max"),
                "precision": 0 if param["type"] == "int" else None,
            }
        if kind == "checkbox":
            return {**common, "value": bool(default)}
        if kind == "dropdown":
            return {**common, "choices": list(param.get("choices") or []), "value": default}
        placeholder = {
            "floats": "comma-separated, one per adapter (empty = default)",
            "artifact": "a saved fusion name or a path (empty = none)",
            "float": "a number (empty = default)",
            "int": "a whole number (empty = default)",
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
    by_method: list = field(default_factory=list)  # (adapters, method): offering the kind the method takes

    def components(self) -> list:
        return self.language + self.task + self.adapters + self.fusions

    def updates(self, engine: Backend) -> list:
        language = adapter_choices(engine, "language", True)
        task = adapter_choices(engine, "task", True)
        every = adapter_choices(engine)
        fusions = fusion_choices(engine)
        return (
            [gr.update(choices=language) for _ in self.language]
            + [gr.update(choices=task) for _ in self.task]
            + [gr.update(choices=every) for _ in self.adapters]
            + [gr.update(choices=fusions) for _ in self.fusions]
        )

    def kind_updates(self, engine: Backend, methods: list) -> list:
        """Choices of the `by_method` pickers, given their methods' current values in order."""
        return [gr.update(choices=kind_choices(engine, method)) for method in methods]


@dataclass
class Studio:
    """What every tab builder receives: the engine and the app-wide helpers."""

    engine: Backend
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
