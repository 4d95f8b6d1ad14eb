"""The engine: one base model per process, a library of adapters, self-contained requests."""

from __future__ import annotations

import json
import threading
import time
import unicodedata
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from . import runtime
from .api import Backend, BaseInfo, FusionRequest, GenerationEvent, LibraryFolders, RequestInfo, Sampling
from .artifacts import FusionArtifact, save_artifact
from .errors import FusionError
from .library import Library, check_name
from .limits import LIMITS
from .methods import METHODS, BuildContext, FitResult, get_method
from .model import DEFAULT_MODEL, load_base_model
from .runtime import FusionPlan, Run, activate
from .safe_io import atomic_folder
from .scheduler import Scheduler
from .training import TrainConfig, encode_chat, parse_records, tokenize_records

MERGE_WAIT_S = 2.0  # how long a merge waits for the model (the scheduler lets go of it between replies)


def clean_text(text: str, what: str = "message") -> str:
    """Drop control characters (keeping newlines and tabs); refuse empty or oversized text."""
    if not isinstance(text, str):
        raise FusionError(f"the {what} must be text")
    if len(text) > LIMITS.max_prompt_chars:
        raise FusionError(f"the {what} is {len(text)} characters long; the limit is {LIMITS.max_prompt_chars}")
    text = "".join(ch for ch in text if ch in "\n\t" or unicodedata.category(ch)[0] != "C")
    if not text.strip():
        raise FusionError(f"the {what} is empty")
    return text


class Engine(Backend):
    """The `Backend` over a model loaded in this process. Beyond the protocol, in-process callers
    (the CLI, export, the lab, benchmarks) use `plan`, `using`, `logits`, `generate_ids_many`,
    `model` and `library`."""

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        device: str | None = "cpu",
        dtype: str = "float32",
        adapters_dir=None,
        fusions_dir=None,
        progress=print,
        base=None,
        merge_static: str = "auto",
    ):
        """merge_static: "auto" merges a static fusion into the weights while it is the only
        fusion decoding and no one else uses the model (exact restore afterwards); "never"
        always applies it as low-rank factors."""
        if merge_static not in ("auto", "never"):
            raise FusionError(f"merge_static must be 'auto' or 'never', got {merge_static!r}")
        self.merge_static = merge_static
        self._model_lock = runtime.ModelLock()
        self.base = base or load_base_model(model, device=device, dtype=dtype, progress=progress)
        runtime.install(self.base.model)
        self.model = self.base.model
        self.tokenizer = self.base.tokenizer
        self.library = Library(self.model, adapters_dir, fusions_dir, self.base.device, self.base.dtype)
        self.ctx = BuildContext(self.model, self.base.device, self.base.dtype, self.library.get_fusion)
        self._plans: OrderedDict[tuple, FusionPlan] = OrderedDict()
        self._plans_lock = threading.Lock()
        # Every generation decodes in one continuous batch, whatever its fusion.
        self.scheduler = Scheduler(
            self.model,
            lambda: self.tokenizer,
            self._model_lock,
            merge_static == "auto",
            LIMITS.max_batch_rows,
            LIMITS.kv_budget_mb * 2**20,
        )

    # ---- what is available -------------------------------------------------------------
    def methods(self) -> list[dict]:
        return [m.describe() for m in METHODS.values()]

    def adapters(self) -> list[dict]:
        return self.library.summaries()

    def fusions(self) -> list[dict]:
        return [f.summary() for f in self.library.fusions.values()]

    def base_info(self) -> BaseInfo:
        return BaseInfo(
            name=self.base.name,
            num_layers=self.base.num_layers,
            hidden_size=self.base.hidden_size,
            device=str(self.base.device),
            dtype=str(self.base.dtype).replace("torch.", ""),
        )

    def library_errors(self) -> dict[str, str]:
        return dict(self.library.errors)

    def library_folders(self) -> LibraryFolders:
        return LibraryFolders(str(self.library.adapters_dir), str(self.library.fusions_dir))

    def rescan(self) -> None:
        self.library.rescan()

    def import_adapter(self, source, name: str | None = None, role: str | None = None, overwrite: bool = False) -> dict:
        adapter = self.library.import_adapter(source, name=name, role=role, overwrite=overwrite)
        return adapter.summary()

    def remove(self, name: str, kind: str) -> None:
        self.library.remove(name, kind)

    # ---- building a request's fusion ---------------------------------------------------
    def resolve(self, request: FusionRequest):
        """-> (method, adapters, coerced params). Raises FusionError on anything wrong."""
        method_name, adapter_refs, params = request.method, list(request.adapters), dict(request.params or {})
        if request.fusion:
            artifact = self.library.get_fusion(request.fusion)
            method_name, adapter_refs = artifact.method, list(artifact.adapters)
            fitted = dict(artifact.params)
            if artifact.meta.get("param_ref"):
                fitted[artifact.meta["param_ref"]] = artifact.path
            params = {**fitted, **params}
        method = get_method(method_name)
        if len(adapter_refs) > LIMITS.max_adapters:
            raise FusionError(f"at most {LIMITS.max_adapters} adapters can be fused at once, got {len(adapter_refs)}")
        if method.name == "base":
            adapter_refs = []
        adapters = [self.library.get_adapter(ref) for ref in adapter_refs]
        if len({a.name for a in adapters}) != len(adapters):
            raise FusionError("the same adapter was chosen twice; pick distinct adapters")
        return method, adapters, method.validate(adapters, params)

    def describe(self, request: FusionRequest) -> RequestInfo:
        method, adapters, _ = self.resolve(request)
        return RequestInfo(method=method.name, adapters=[a.name for a in adapters], fusion=request.fusion)

    def plan(self, request: FusionRequest) -> FusionPlan:
        method, adapters, params = self.resolve(request)
        key = (
            self.library.version,
            method.name,
            tuple((a.name, a.path) for a in adapters),
            json.dumps(params, sort_keys=True, default=str),
        )
        with self._plans_lock:
            if key in self._plans:
                self._plans.move_to_end(key)
                return self._plans[key]
        with torch.no_grad():
            plan = method.build(self.ctx, adapters, params)
            plan.deltas = runtime.group_shared_inputs(plan.deltas)
        with self._plans_lock:
            self._plans[key] = plan
            while len(self._plans) > 16:
                self._plans.popitem(last=False)
        return plan

    def clear_plan_cache(self) -> None:
        """Forget built plans, so the next `plan` builds anew (adapters stay loaded)."""
        with self._plans_lock:
            self._plans.clear()

    @contextmanager
    def using(self, plan: FusionPlan, merge: bool | None = None) -> Iterator[FusionPlan]:
        """Hold the model for running `plan`; yields the plan to run the model with.

        merge=None, the serving policy: with merge_static "auto", a static plan is merged into the
        weights while no other request uses the model (bit-exact restore afterwards); anything
        else runs as low-rank factors next to other requests. merge=True merges or raises
        FusionError (a dynamic plan, or a busy model); merge=False never merges.
        """
        if merge is None:
            merge = bool(
                plan.is_static and plan.deltas and self.merge_static == "auto" and self._model_lock.try_exclusive()
            )
        elif merge:
            if not plan.is_static:
                raise FusionError(f"method {plan.method!r} fuses per token; it cannot be merged into the weights")
            # a reply that has just ended gives the model back a moment after its last event
            if not self._model_lock.try_exclusive(timeout=MERGE_WAIT_S):
                raise FusionError("the model is busy with other requests; try again when it is idle")
        if merge:
            try:
                with runtime.merged_into(self.model, plan) as merged:
                    yield merged
            finally:
                self._model_lock.release_exclusive()
            return
        with self._model_lock.shared():
            yield plan

    # ---- generation ----------------------------------------------------------------------
    def encode_messages(self, messages: list[dict] | str, system: str | None = None) -> list[int]:
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        if not messages:
            raise FusionError("the conversation is empty")
        cleaned = []
        if system:
            cleaned.append({"role": "system", "content": clean_text(system, "system prompt")})
        for m in messages:
            if m.get("role") not in ("system", "user", "assistant"):
                raise FusionError(f"message role {m.get('role')!r} is not one of system, user, assistant")
            cleaned.append({"role": m["role"], "content": clean_text(str(m.get("content", "")))})
        ids = encode_chat(self.tokenizer, cleaned, add_generation_prompt=True)
        if len(ids) > LIMITS.max_prompt_tokens:
            raise FusionError(
                f"the conversation is {len(ids)} tokens long; the limit is "
                f"{LIMITS.max_prompt_tokens}: shorten it or clear the history"
            )
        return ids

    def stream(
        self,
        request: FusionRequest,
        messages: list[dict] | str,
        sampling: Sampling | None = None,
        system: str | None = None,
        cancel: threading.Event | None = None,
        trace: bool = True,
    ) -> Iterator[GenerationEvent]:
        sampling = (sampling or Sampling()).validate()
        prompt_ids = self.encode_messages(messages, system)
        yield from self.stream_ids(request, prompt_ids, sampling, cancel, trace)

    def stream_ids(
        self,
        request: FusionRequest,
        prompt_ids: list[int],
        sampling: Sampling,
        cancel: threading.Event | None = None,
        trace: bool = True,
    ) -> Iterator[GenerationEvent]:
        yield from self.scheduler.stream(self.plan(request), prompt_ids, sampling, cancel, trace)

    def generate_ids_many(
        self,
        request: FusionRequest,
        prompts: list[list[int]],
        sampling: Sampling,
        cancel: threading.Event | None = None,
        trace: bool = False,
    ) -> Iterator[GenerationEvent]:
        """Whole replies to many token-id prompts under one request, decoded together in the
        scheduler: the last event of each, in the prompts' order, as soon as it is ready."""
        sampling = sampling.validate()
        yield from self.scheduler.finals(self.plan(request), prompts, sampling, cancel, trace)

    @torch.no_grad()
    def logits(self, request: FusionRequest, input_ids: torch.Tensor, record: bool = False):
        """Full forward without cache: logits (B, T, V) and the run (for its recorded trace)."""
        run = Run(self.plan(request), record=record)
        with self._model_lock.shared(), activate(run):
            out = self.model(input_ids=input_ids.to(self.base.device), use_cache=False).logits
        return out, run

    # ---- fitting -------------------------------------------------------------------------
    def fit(
        self,
        method_name: str,
        adapters: list[str],
        records: list[dict] | str,
        params: dict | None = None,
        train: dict | None = None,
        save_as: str | None = None,
        out: str | None = None,
        overwrite: bool = False,
        system: str | None = None,
        on_progress=None,
        cancel: threading.Event | None = None,
        **options,
    ) -> FusionArtifact:
        """Fit a method's learnable part on examples.

        Fusion methods (lora_flow, cat, lorahub) learn weights over the chosen adapters and
        give a fitted fusion; `save_as` stores it in the library, `out` in any folder.
        Methods that fit from scratch (mixlora) train a new adapter, stored the same way in
        the adapter library; the returned artifact then names that adapter. A fit stopped by
        `cancel` is returned (meta "cancelled") but stored nowhere, so its name stays free.
        """
        method = get_method(method_name)
        if not method.fittable:
            raise FusionError(f"method {method_name!r} has nothing to fit")
        if save_as:
            check_name(save_as)
        if method.fit_from_scratch:
            adapter_objs, coerced = [], method.coerce_params(params)
        else:
            _, adapter_objs, coerced = self.resolve(FusionRequest(adapters, method_name, params or {}))
        if isinstance(records, str):
            records = parse_records(records, "examples")
        if len(records) > LIMITS.max_fit_examples:
            raise FusionError(f"{len(records)} examples exceed the limit of {LIMITS.max_fit_examples}")
        examples = tokenize_records(self.tokenizer, records, system)
        unknown = sorted(set(train or {}) - set(TrainConfig.__dataclass_fields__))
        if unknown:
            raise FusionError(
                f"unknown training option {unknown[0]!r}; known: {', '.join(sorted(TrainConfig.__dataclass_fields__))}"
            )
        start = time.perf_counter()
        with self._model_lock.shared():
            result = self._fit_locked(method, adapter_objs, examples, coerced, train, options, on_progress, cancel)
        meta = dict(result.meta)
        meta.update(
            {
                "examples": len(examples),
                "seconds": round(time.perf_counter() - start, 2),
                "losses": [round(x, 5) for x in result.losses],
                "cancelled": bool(cancel is not None and cancel.is_set()),
                "base_model": self.base.name,
            }
        )
        if result.param_ref:
            meta["param_ref"] = result.param_ref
        store = not meta["cancelled"]
        if method.fit_from_scratch:
            return self._save_trained_adapter(method_name, result, coerced, meta, save_as, out, overwrite, store)
        params_out = {
            k: v for k, v in {**coerced, **result.params}.items() if v not in (None, "") and k != result.param_ref
        }
        artifact = FusionArtifact(
            name=save_as or (Path(out).name if out else f"{method_name}-fit"),
            method=method_name,
            adapters=[a.name for a in adapter_objs],
            params=params_out,
            tensors=result.tensors,
            meta=meta,
        )
        if save_as and store:
            artifact = self.library.save_fusion(artifact, overwrite=overwrite)
        elif out and store:
            save_artifact(artifact, out, overwrite=overwrite)
        return artifact

    def _fit_locked(self, method, adapters, examples, params, train, options, on_progress, cancel) -> FitResult:
        """Training runs forwards on the shared model, so it must never see merged weights."""
        return method.fit(
            self.ctx,
            adapters,
            examples,
            params,
            {"train": dict(train or {}), "pad_id": self.tokenizer.pad_token_id, **options},
            on_progress,
            cancel,
        )

    def _save_trained_adapter(self, method_name, result, params, meta, save_as, out, overwrite, store=True):
        name = save_as or (Path(out).name if out else f"{method_name}-trained")
        artifact = FusionArtifact(name=name, method=method_name, adapters=[name], params={}, meta=meta)
        if not store:
            return artifact
        if save_as:
            self.library.save_adapter(save_as, result.save_adapter, overwrite=overwrite)
            artifact.path = str(self.library.adapters_dir / save_as)
        elif out:
            with atomic_folder(out, overwrite=overwrite) as tmp:
                result.save_adapter(tmp)
            artifact.path = str(out)
        return artifact
