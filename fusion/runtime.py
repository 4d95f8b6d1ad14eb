"""Per-request fusion applied to one shared base model.

The base model is patched once: each decoder-layer projection, each MLP and each decoder layer
gets a thin forward that asks "is a fusion run active on this thread?". With none active the
model computes exactly its base function. A request activates its own `Run` (a fusion plan
plus per-forward scratch state) around each model call, so concurrent requests on different
threads never see each other's fusion and nothing shared is mutated.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
import threading
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .adapters import ALL_MODULES, ATTENTION_MODULES
from .errors import FusionError

_local = threading.local()


def current_run() -> Run | None:
    return getattr(_local, "run", None)


@contextmanager
def activate(run: Run | None):
    """Make `run` the active fusion for model calls on this thread, for the block's duration."""
    previous = getattr(_local, "run", None)
    _local.run = run
    if run is not None:
        run.begin_forward()
    try:
        yield run
    finally:
        _local.run = previous
        if run is not None:
            run.end_forward()


def add_low_rank(y: torch.Tensor, h: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """y + h @ B.T as one fused addmm (one kernel instead of a matmul and an add)."""
    out = torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]), B.t())
    return out.view(y.shape)


@dataclass
class LowRankDelta:
    """Stacked low-rank update of one Linear: y += B @ (coef * (A @ x)) [* slot weights].

    Ranks of all slots are stacked so one matmul serves every LoRA of the module.
    """

    A: torch.Tensor  # (R, d_in)
    B: torch.Tensor  # (d_out, R); static scales are folded in here
    slot_of_rank: torch.Tensor | None = None  # (R,) long: slot whose dynamic weight scales each rank
    coef: torch.Tensor | None = None  # (R,) optional per-rank factor kept separate (needs grad)
    # Where the stacked ranks come from, in order: (LoraFactors, coefficient incl. its scale, slot).
    # Batched decoding shares one table of the adapters' own factors among many plans through it.
    parts: tuple = ()

    def apply(self, x: torch.Tensor, y: torch.Tensor, run: Run, layer: int) -> torch.Tensor:
        h = F.linear(x, self.A)  # (..., R)
        if self.coef is not None:
            h = h * self.coef
        if self.slot_of_rank is not None:
            weights = run.layer_weights[layer]  # (B, T, k)
            h = h * weights.index_select(-1, self.slot_of_rank)
        return add_low_rank(y, h, self.B)


@dataclass
class SharedInputGroup:
    """Projections of one layer that read the same input (q/k/v; gate/up): their A factors
    are stacked so one matmul serves them all; each member then applies its own B."""

    A: torch.Tensor  # (R_total, d_in)
    slot_of_rank: torch.Tensor | None  # (R_total,) for dynamic plans
    key: tuple[int, str]


@dataclass
class GroupMember:
    group: SharedInputGroup
    start: int
    end: int
    B: torch.Tensor  # (d_out, end - start), static scales folded in
    parts: tuple = ()  # as LowRankDelta.parts

    def apply(self, x: torch.Tensor, y: torch.Tensor, run: Run, layer: int) -> torch.Tensor:
        cached = run.group_inputs.get(self.group.key)
        if cached is None or cached[0] is not x:
            h = F.linear(x, self.group.A)  # (..., R_total)
            if self.group.slot_of_rank is not None:
                h = h * run.layer_weights[layer].index_select(-1, self.group.slot_of_rank)
            cached = (x, h)
            run.group_inputs[self.group.key] = cached
        return add_low_rank(y, cached[1][..., self.start : self.end], self.B)


SHARED_INPUTS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def group_shared_inputs(deltas: dict) -> dict:
    """Rewrite plain deltas of projections sharing an input into grouped ones (same values).

    Deltas that carry trainable tensors are left alone (training builds plans every step).
    """
    out = dict(deltas)
    layers = {layer for layer, _ in deltas}
    for layer in layers:
        for names in SHARED_INPUTS:
            members = [(n, deltas.get((layer, n))) for n in names]
            members = [(n, d) for n, d in members if isinstance(d, LowRankDelta)]
            if len(members) < 2 or any(
                d.coef is not None or d.A.requires_grad or d.B.requires_grad for _, d in members
            ):
                continue
            dynamic = [d.slot_of_rank is not None for _, d in members]
            if any(dynamic) and not all(dynamic):
                continue
            A = torch.cat([d.A for _, d in members], 0)
            slots = torch.cat([d.slot_of_rank for _, d in members]) if all(dynamic) else None
            group = SharedInputGroup(A, slots, (layer, names[0]))
            start = 0
            for name, d in members:
                end = start + d.A.shape[0]
                out[(layer, name)] = GroupMember(group, start, end, d.B, d.parts)
                start = end
    return out


@dataclass
class FusionPlan:
    """What a fusion method built for one request: immutable, cacheable, shareable."""

    method: str
    slot_names: list[str]
    deltas: dict[tuple[int, str], LowRankDelta] = field(default_factory=dict)
    # Dynamic per-layer weights: (layer, hidden (B, T, d)) -> weights (B, T, k). LoRA-Flow.
    layer_gate: Callable[[int, torch.Tensor], torch.Tensor] | None = None
    # Replacement MLP forward per layer: (layer, mlp module, x) -> y. MixLoRA.
    mlp_override: Callable | None = None
    # Fixed per-layer slot weights for traces of static methods: (layers, k).
    static_weights: torch.Tensor | None = None
    # Optional per-module static weights for traces: module name -> (layers, k).
    module_weights: dict[str, torch.Tensor] | None = None
    trace_kind: str = "static"  # static | gate | router
    # LoRA-Flow's gate as tensors, so batched decoding can stack the gates of many plans:
    # (W (L, k, d), b (L, 1, k), temperature).
    gate_tensors: tuple | None = None
    # MixLoRA's routed FFN as tensors, for the same reason: (routers per layer (E, d), layer ->
    # {module: (A (E, r, d_in), B (E, d_out, r))}, top_k, activation or None = the model's).
    experts: tuple | None = None
    info: dict = field(default_factory=dict)

    @property
    def is_static(self) -> bool:
        return self.layer_gate is None and self.mlp_override is None


class Run:
    """A plan in use by one request: per-forward scratch state and trace recording."""

    def __init__(self, plan: FusionPlan, record: bool = False):
        self.plan = plan
        self.deltas = plan.deltas
        self.record = record
        self.layer_weights: dict[int, torch.Tensor] = {}
        self.steps: list[dict[int, torch.Tensor]] = []  # recorded per forward: layer -> (T, k)
        self.router_steps: list[dict[int, tuple[torch.Tensor, torch.Tensor]]] = []
        self.extra_losses: list[torch.Tensor] = []  # e.g. MixLoRA router logits for aux loss
        self._router_now: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._weights_now: dict[int, torch.Tensor] = {}
        self.group_inputs: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}

    def begin_forward(self) -> None:
        self.layer_weights = {}
        self.group_inputs = {}
        self._weights_now = {}
        self._router_now = {}

    def end_forward(self) -> None:
        if self.record:
            if self._weights_now:
                self.steps.append(self._weights_now)
            if self._router_now:
                self.router_steps.append(self._router_now)
        self._weights_now = {}
        self._router_now = {}
        self.group_inputs = {}

    def on_layer_input(self, layer: int, hidden: torch.Tensor) -> None:
        gate = self.plan.layer_gate
        if gate is None:
            return
        weights = gate(layer, hidden)  # (B, T, k)
        self.layer_weights[layer] = weights
        if self.record:
            self._weights_now[layer] = weights[0].detach().float().cpu()

    def on_router(self, layer: int, probs: torch.Tensor, chosen: torch.Tensor) -> None:
        """probs (B, T, E) router probabilities, chosen (B, T, k) expert ids; batch 0 is recorded."""
        if self.record:
            self._router_now[layer] = (probs[0].detach().float().cpu(), chosen[0].detach().cpu())


def _linear_forward(linear: torch.nn.Linear, layer: int, name: str):
    base_forward = linear.forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        y = base_forward(x)
        run = getattr(_local, "run", None)
        if run is None:
            return y
        delta = run.deltas.get((layer, name))
        if delta is None:
            return y
        return delta.apply(x, y, run, layer)

    return forward


def _mlp_forward(mlp: torch.nn.Module, layer: int):
    base_forward = mlp.forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        run = getattr(_local, "run", None)
        if run is not None and run.plan.mlp_override is not None:
            return run.plan.mlp_override(layer, mlp, x, run)
        return base_forward(x)

    return forward


def _layer_forward(decoder_layer: torch.nn.Module, layer: int):
    base_forward = decoder_layer.forward

    def forward(*args, **kwargs):
        run = getattr(_local, "run", None)
        if run is not None and run.plan.layer_gate is not None:
            hidden = args[0] if args else kwargs["hidden_states"]
            run.on_layer_input(layer, hidden)  # the residual stream before input_layernorm
        return base_forward(*args, **kwargs)

    return forward


def install(model: torch.nn.Module) -> None:
    """Patch a Llama-family causal LM once so that runs can fuse into it. Idempotent."""
    if getattr(model, "_fusion_installed", False):
        return
    for index, decoder_layer in enumerate(model.model.layers):
        decoder_layer.forward = _layer_forward(decoder_layer, index)
        decoder_layer.mlp.forward = _mlp_forward(decoder_layer.mlp, index)
        for name in ALL_MODULES:
            block = decoder_layer.self_attn if name in ATTENTION_MODULES else decoder_layer.mlp
            linear = getattr(block, name, None)
            if linear is not None:
                linear.forward = _linear_forward(linear, index, name)
    model._fusion_installed = True


def linear_of(model: torch.nn.Module, layer: int, name: str) -> torch.nn.Linear:
    block = model.model.layers[layer]
    return getattr(block.self_attn if name in ATTENTION_MODULES else block.mlp, name)


MERGED_WEIGHT = "_fusion_merged"  # attribute of a weight `merged_into` swapped in: the original weight


@contextmanager
def merged_into(model: torch.nn.Module, plan: FusionPlan, reuse_buffers: bool | None = None):
    """Fast path for a static plan on a model the caller holds exclusively.

    Each touched Linear gets a new weight tensor W + delta; the original tensor is kept aside
    (not copied, not modified) and put back afterwards, so the restore is bit-exact.
    Yields the plan to run with: the same plan without deltas.

    reuse_buffers (default: on CPU): the merged weights are written into buffers kept on the
    model and reused by the next merge, instead of fresh memory each time. Fresh memory costs a
    page fault per 4 KiB on first touch and an unmap afterwards, about half of a switch on CPU;
    the price is one copy of the touched weights held from the first merge on. GPU allocators
    already recycle blocks, so there the buffers are freed with the request.
    """
    if not plan.is_static:
        raise ValueError("only static plans can be merged")
    originals = {}
    buffers = None
    try:
        with torch.no_grad():
            for (layer, name), delta in plan.deltas.items():
                linear = linear_of(model, layer, name)
                weight = linear.weight
                if buffers is None and (reuse_buffers if reuse_buffers is not None else weight.device.type == "cpu"):
                    buffers = model.__dict__.setdefault("_fusion_merge_buffers", {})
                originals[(layer, name)] = weight
                A, B = delta_factors(delta)
                A, B = A.to(weight.dtype), B.to(weight.dtype)
                # W + B A in one addmm: no dense delta is materialised on its own.
                if buffers is not None:
                    out = buffers.get((layer, name))
                    if (
                        out is None
                        or out.shape != weight.shape
                        or out.dtype != weight.dtype
                        or out.device != weight.device
                    ):
                        with torch.inference_mode(False):  # a normal tensor: usable in and out of inference mode
                            out = buffers[(layer, name)] = torch.empty_like(weight)
                    merged = torch.addmm(weight, B, A, out=out)
                else:
                    merged = torch.addmm(weight, B, A)
                linear.weight = torch.nn.Parameter(merged, requires_grad=False)
                setattr(linear.weight, MERGED_WEIGHT, weight)  # lives for this merge: `packed` skips it
        yield FusionPlan(
            method=plan.method,
            slot_names=plan.slot_names,
            static_weights=plan.static_weights,
            module_weights=plan.module_weights,
            trace_kind=plan.trace_kind,
            info={**plan.info, "merged": True},
        )
    finally:
        for (layer, name), weight in originals.items():
            linear_of(model, layer, name).weight = weight
        if originals and buffers is None:
            release_freed_memory()


def release_freed_memory() -> None:
    """Hand the merged weights' freed pages back to the system (glibc keeps them otherwise,
    so memory would swing by a weight copy per merged request)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


def delta_factors(delta) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r, d_in), B (d_out, r)) of a static delta, plain or grouped, with any per-rank factor
    folded into B: the update is B @ A."""
    if isinstance(delta, GroupMember):
        return delta.group.A[delta.start : delta.end], delta.B
    if isinstance(delta, LowRankDelta):
        if delta.slot_of_rank is not None:
            raise FusionError("a dynamic fusion has no fixed factors")
        return delta.A, (delta.B if delta.coef is None else delta.B * delta.coef)
    raise FusionError(f"a delta of type {type(delta).__name__} has no low-rank factors")


class ModelLock:
    """Readers (requests that fuse per request) share the model; a writer (a request that
    merges its static fusion into the weights) holds it alone. Writers never wait: they
    merge only when the model is idle, otherwise they run unmerged as readers."""

    def __init__(self):
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False

    @contextmanager
    def shared(self):
        self.acquire_shared()
        try:
            yield
        finally:
            self.release_shared()

    def acquire_shared(self) -> None:
        with self._cond:
            while self._writer:
                self._cond.wait()
            self._readers += 1

    def release_shared(self) -> None:
        with self._cond:
            self._readers -= 1
            self._cond.notify_all()

    def try_exclusive(self, timeout: float = 0.0) -> bool:
        """Hold the model alone if it is free, or becomes free within `timeout` seconds."""
        with self._cond:
            if not self._cond.wait_for(lambda: not (self._writer or self._readers), timeout):
                return False
            self._writer = True
            return True

    def release_exclusive(self) -> None:
        with self._cond:
            self._writer = False
            self._cond.notify_all()
