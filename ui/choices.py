"""What the user picked, turned into what runs: library choices for the pickers, the adapters a
method can take, the one request builder and label every tab and endpoint uses, and refusals
that say what to do."""

from __future__ import annotations

import json

from fusion.api import Backend, FusionRequest
from fusion.errors import FusionError

from .constants import CHAT_EXAMPLES, NONE, PREFERRED


def adapter_choices(engine: Backend, role: str | None = None, with_none: bool = False) -> list:
    """(label, name) pairs; `role` filters, "(none)" first when asked."""
    rows = [a for a in engine.adapters() if role is None or a["role"] == role]
    choices = [(NONE, NONE)] if with_none else []
    for a in rows:
        label = a["name"] if a.get("kind", "lora") == "lora" else f"{a['name']} ({a['kind']})"
        choices.append((label, a["name"]))
    return choices


def kind_choices(engine: Backend, method: str | None) -> list:
    """The adapters a method can take (all of them for the base model)."""
    spec = method_spec(engine, method)
    kind = spec.get("adapter_kind") if spec.get("name") not in (None, "base") else None
    kinds = {a["name"]: a.get("kind", "lora") for a in engine.adapters()}
    return [(label, name) for label, name in adapter_choices(engine) if kind is None or kinds.get(name) == kind]


def fusion_choices(engine: Backend) -> list:
    choices = [(NONE, NONE)]
    for f in engine.fusions():
        choices.append((f"{f['name']}  ·  {f['method']} over {' + '.join(f['adapters']) or 'new adapter'}", f["name"]))
    return choices


def method_choices(engine: Backend, fittable: bool = False) -> list:
    return [(m["pretty_name"] or m["name"], m["name"]) for m in engine.methods() if m["fittable"] or not fittable]


def preferred(choices: list, wanted: str | None, fallback_index: int | None = 0):
    names = [value for _, value in choices if value != NONE]
    if wanted in names:
        return wanted
    if fallback_index is None or not names:
        return NONE if any(v == NONE for _, v in choices) else None
    return names[min(fallback_index, len(names) - 1)]


def default_selection(engine: Backend) -> dict:
    """Sensible first choices: lang-es + task-math + LoRA-Flow when the library has them, with the
    fitted es-math-flow gates when shipped."""
    lang = preferred(adapter_choices(engine, "language", True), PREFERRED["language"])
    task = preferred(adapter_choices(engine, "task", True), PREFERRED["task"])
    chosen = [a for a in (lang, task) if a not in (None, NONE)]
    methods = {m["name"] for m in engine.methods()}
    method = (
        PREFERRED["method"]
        if len(chosen) == 2 and PREFERRED["method"] in methods
        else "single"
        if len(chosen) == 1 and "single" in methods
        else "base"
    )
    fitted = f"{(lang or '').removeprefix('lang-')}-math-flow"  # the shipped gates for this pair, if fitted
    fusion = (
        fitted
        if method == "lora_flow" and task == "task-math" and fitted in {f["name"] for f in engine.fusions()}
        else NONE
    )
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
        raise FusionError(f'params must be a JSON object such as {{"temperature": 1.0}} ({exc.msg})') from None
    if not isinstance(params, dict):
        raise FusionError('params must be a JSON object such as {"temperature": 1.0}')
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


def request_label(engine: Backend, request: FusionRequest | Exception) -> str:
    """What produced a reply, as chat bubbles, status lines and compare columns name it:
    "es-math-flow (lora_flow) · lang-es + task-math" or "linear · lang-es + task-math"."""
    if isinstance(request, Exception):
        return "invalid choice"
    try:
        info = engine.describe(request)
    except Exception:  # the run itself reports the problem
        return request.fusion or request.method
    head = f"{request.fusion} ({info.method})" if request.fusion else info.method
    return f"{head} · {' + '.join(info.adapters)}" if info.adapters else head


def saved_fusion(engine: Backend, name: str | None) -> dict | None:
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


def describe_fusion(engine: Backend, name: str | None) -> str:
    if not name or name == NONE:
        return ""
    fusion = saved_fusion(engine, name)
    if fusion is None:
        return f"Saved fusion **{name}** is no longer in the library."
    return (
        f"**{name}** runs `{fusion['method']}` over {', '.join(fusion['adapters']) or 'no adapter'} with its "
        "fitted weights, as the pickers show. Changing the method or an adapter leaves the fusion."
    )


def method_spec(engine: Backend, name: str | None) -> dict:
    return next((m for m in engine.methods() if m["name"] == name), {})


def adapters_for(engine: Backend, method: str | None, chosen: list[str], defaults: list[str]) -> list[str]:
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
        kept = kept[len(kept) - most :]
    wanted = max(1, spec.get("min_adapters") or 0)
    if len(kept) < wanted:
        roles = {a["name"]: a.get("role") for a in library}
        # A default of a role not yet chosen (the task LoRA first when one adapter is enough),
        # then anything of the right kind.
        preferred = list(reversed(defaults)) if most == 1 else list(defaults)
        for candidate in preferred + [a["name"] for a in library]:
            taken = {roles.get(a) for a in kept} - {"other"}
            if (
                len(kept) < wanted
                and kinds.get(candidate) == kind
                and candidate not in kept
                and (candidate not in defaults or roles.get(candidate) not in taken)
            ):
                kept.append(candidate)
        slot = {"language": 0, "task": 2}
        kept.sort(key=lambda a: slot.get(roles.get(a), 1))  # the slot order: language first, task last
    return kept


def check_choice(engine: Backend, request: FusionRequest) -> None:
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
            raise FusionError(
                f"{pretty} needs exactly one {kind} adapter{example}: pick it under More LoRAs "
                "and set the language and task pickers to (none)"
            )
        return
    odd = [a for a in request.adapters if kinds.get(a, "lora") != "lora"]
    if odd:
        raise FusionError(
            f"{pretty} fuses LoRAs, and {odd[0]} is a {kinds[odd[0]]} adapter: remove it from "
            "More LoRAs or pick the method made for it"
        )
    least, most = spec.get("min_adapters") or 0, spec.get("max_adapters")
    if most is not None and len(request.adapters) > most:
        raise FusionError(
            f"{pretty} applies {most} LoRA, got {len(request.adapters)}: set the language or the task picker to (none)"
            if most == 1
            else f"{pretty} takes at most {most} LoRAs, got {len(request.adapters)}"
        )
    if len(request.adapters) < least:
        raise FusionError(
            f"{pretty} needs at least {least} LoRAs, got {len(request.adapters)}: pick a language and a task LoRA"
        )


def chat_examples(engine: Backend, path=None) -> list[dict]:
    """The shipped example questions whose fusion is in the library ([] without the file)."""
    try:
        examples = json.loads((path or CHAT_EXAMPLES).read_text(encoding="utf-8"))["examples"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    fusions = {f["name"] for f in engine.fusions()}
    return [e for e in examples if isinstance(e, dict) and e.get("fusion") in fusions and e.get("question")]


def example_label(example: dict, width: int = 44) -> str:
    question = " ".join(str(example["question"]).split())
    short = question if len(question) <= width else question[: width - 1].rstrip() + "…"
    return f"{example.get('lang', '?')} · {short}"
