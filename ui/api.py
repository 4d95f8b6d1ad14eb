"""Named API endpoints for gradio_client: /methods, /adapters, /generate, /compare, /fit.

Each takes plain values (lists, strings, numbers, JSON text) and returns JSON; a problem the
caller can fix comes back as an error with one readable sentence.
"""

from __future__ import annotations

import json
import threading

import gradio as gr

from fusion import plots
from fusion.api import Backend, Sampling
from fusion.errors import FusionError

from .choices import build_request, parse_adapters, parse_params
from .common import error_line
from .constants import APP
from .side_by_side import run_side_by_side


def plain(value):
    """JSON for the client: a dict key named "path" would be taken for a file to download, so
    library locations are reported as "folder"."""
    if isinstance(value, dict):
        return {("folder" if key == "path" else key): plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [plain(item) for item in value]
    return value


def _fail(exc: Exception):
    raise gr.Error(error_line(exc), print_exception=False) from None


def register_api(engine: Backend) -> None:
    """Call inside a gr.Blocks context."""

    def methods() -> list[dict]:
        """Every fusion method with its declared parameters (name, type, default, range, help)."""
        return plain(engine.methods())

    def adapters() -> dict:
        """The library: adapters (name, kind, role, rank, targets, …), saved fitted fusions and load errors."""
        return plain({"adapters": engine.adapters(), "fusions": engine.fusions(), "errors": engine.library_errors()})

    def generate(
        adapters: list[str] | str = "",
        method: str = "base",
        params: str = "{}",
        prompt: str = "",
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        fusion: str = "",
        system: str = "",
    ) -> dict:
        """One reply from the fused model. `adapters`: list or comma-separated names (slot order);
        `params`: JSON object of the method's parameters; `fusion`: a saved fusion (overrides method
        and adapters). Returns text, timings and a trace summary {shape, slot_names, kind}."""
        try:
            request = build_request(method, adapters, params, fusion)
            sampling = Sampling(max_new_tokens=int(max_new_tokens), temperature=float(temperature))
            event = engine.generate(request, prompt, sampling, system=system or None)
            info = engine.describe(request)
        except Exception as exc:
            _fail(exc)
        return {
            "text": event.text,
            "method": info.method,
            "adapters": info.adapters,
            "fusion": fusion or None,
            "finish_reason": event.finish_reason,
            "new_tokens": len(event.token_ids),
            "prompt_tokens": event.prompt_tokens,
            "seconds_to_first_token": event.seconds_to_first_token,
            "tokens_per_second": event.tokens_per_second,
            "trace": plots.trace_summary(event.trace),
        }

    def compare(prompt: str, columns: str, max_new_tokens: int = 64, temperature: float = 0.0) -> list[dict]:
        """Several fusions on one prompt, advanced together. `columns`: JSON list (2–4) of
        {"method", "adapters", "params", "fusion"}. Returns one result per column (text, timings,
        trace summary, or the column's error)."""
        try:
            specs = json.loads(columns) if isinstance(columns, str) else columns
            if not isinstance(specs, list) or not 1 <= len(specs) <= APP.max_compare:
                raise FusionError(f"columns must be a JSON list of 1 to {APP.max_compare} objects")
            requests = []
            for spec in specs:
                if not isinstance(spec, dict):
                    raise FusionError("each column must be a JSON object with method, adapters and params")
                try:
                    requests.append(
                        build_request(
                            spec.get("method", "base"), spec.get("adapters"), spec.get("params"), spec.get("fusion")
                        )
                    )
                except FusionError as exc:
                    requests.append(exc)
            sampling = Sampling(max_new_tokens=int(max_new_tokens), temperature=float(temperature)).validate()
            results = []
            for results in run_side_by_side(engine, requests, prompt, sampling, None, threading.Event()):
                pass
        except Exception as exc:
            _fail(exc)
        return [r.summary() for r in results]

    def fit(
        method: str,
        adapters: list[str] | str,
        examples: str,
        save_as: str,
        params: str = "{}",
        epochs: int = 1,
        lr: float = 0.0,
        batch_size: int = 4,
        max_steps: int = 0,
        overwrite: bool = False,
    ) -> dict:
        """Fit a method (lora_flow, cat, lorahub, …) on JSONL examples ({"prompt", "response"} per
        line) and save it under `save_as`; lr 0 = the method's default. Returns the saved fusion."""
        from .fit import check_free_name, train_options

        try:
            if not (save_as or "").strip():
                raise FusionError("save_as is required: the fitted fusion is saved under that name")
            train = train_options(epochs, lr, batch_size, max_steps)
            check_free_name(engine, save_as.strip(), bool(overwrite), method)
            artifact = engine.fit(
                method,
                parse_adapters(adapters),
                examples,
                parse_params(params),
                train=train,
                save_as=save_as.strip(),
                overwrite=bool(overwrite),
            )
        except Exception as exc:
            _fail(exc)
        return {
            "name": artifact.name,
            "method": artifact.method,
            "adapters": artifact.adapters,
            "losses": artifact.meta.get("losses", []),
            "seconds": artifact.meta.get("seconds"),
            "folder": artifact.path,
        }

    gr.api(methods, api_name="methods")
    gr.api(adapters, api_name="adapters")
    gr.api(generate, api_name="generate", concurrency_id="generate")
    gr.api(compare, api_name="compare", concurrency_id="generate")
    gr.api(fit, api_name="fit", concurrency_limit=1, concurrency_id="fit")
