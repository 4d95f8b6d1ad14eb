"""LoRA-Flow's gates of a decoding step's layer and every row's per-rank scales
(`batch_layout.Layout.gate` and `LayerTables.scales`): `flow_scales` of kernels.c."""

from __future__ import annotations

import ctypes
import functools
import threading

import torch

from .build import checked
from .tables import MAX_ROWS

_P = ctypes.c_void_p


class _Flow(ctypes.Structure):
    """`struct flow_call` of kernels.c."""

    _fields_ = [
        *((name, ctypes.c_int) for name in ("rows", "flow", "slots", "din", "width")),
        ("x", _P),
        ("x_stride", ctypes.c_long),
        *((name, _P) for name in ("flow_rows", "W", "b", "mask", "temps", "coef")),
        ("coef_stride", ctypes.c_long),
        ("slot", _P),
        ("slot_stride", ctypes.c_long),
        ("weights", _P),
        ("scales", _P),
    ]


def flow_call(rows: int, din: int, flow_rows, W, b, mask, temps, coef, slots) -> FlowCall | None:
    """The kernel's call for one layer of a layout: a decoding step's LoRA-Flow gates and every
    row's per-rank scales, what `batch_layout.Layout.gate` and `LayerTables.scales` give for one
    token per row. Its fixed tensors are checked once (a layout keeps one call per layer;
    `FlowCall.run` checks each step's x only); None where the kernel cannot serve (the torch
    path then does). flow_rows (n_flow,) int64; W (n_flow, S, d), b (n_flow, S), mask
    (n_flow, S) or None, temps (n_flow, 1) or None; coef (rows, W) or None; slots (rows, W) int64
    or None. The indices (flow_rows, slots) are the layout's own, not checked here."""
    kernel = _kernel()
    flow, S = b.shape
    gate = [W, b] + [t for t in (mask, temps) if t is not None]
    if not (
        kernel is not None
        and rows <= MAX_ROWS
        and not any(t.requires_grad for t in gate)
        and all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in gate)
        and W.shape == (flow, S, din)
        and flow_rows.shape == (flow,)
        and flow_rows.dtype == torch.int64
    ):
        return None
    if coef is not None and not (
        coef.dtype == torch.float32
        and coef.shape[0] == rows
        and coef.stride(1) == 1
        and (slots is None or (slots.shape == coef.shape and slots.dtype == torch.int64 and slots.stride(1) == 1))
    ):
        return None
    return FlowCall(kernel, rows, din, flow_rows.contiguous(), W, b, mask, temps, coef, slots)


class FlowCall:
    """The kernel's call for one layer: the addresses of the gates, coefficients and slots set
    once (it holds those tensors); `run` gives each step's gates and scales for its x. One call
    at a time (a lock guards the call record)."""

    def __init__(self, kernel, rows, din, flow_rows, W, b, mask, temps, coef, slots):
        self.kernel, self.rows, self.din = kernel, rows, din
        self.flow, self.S = b.shape
        self.width = 0 if coef is None else coef.shape[1]
        self.coef, self.with_scales = coef, slots is not None
        self.tensors = [flow_rows, W, b, mask, temps, coef, slots]
        self.call = _Flow(
            rows=rows,
            flow=self.flow,
            slots=self.S,
            din=din,
            width=self.width,
            flow_rows=flow_rows.data_ptr(),
            W=W.data_ptr(),
            b=b.data_ptr(),
            mask=0 if mask is None else mask.data_ptr(),
            temps=0 if temps is None else temps.data_ptr(),
            coef=0 if coef is None else coef.data_ptr(),
            coef_stride=0 if coef is None else coef.stride(0),
            slot=0 if slots is None else slots.data_ptr(),
            slot_stride=0 if slots is None else slots.stride(0),
        )
        self.ref = ctypes.byref(self.call)
        self.lock = threading.Lock()

    def run(self, x):
        """(weights (n_flow, S), scales (N, W) or the coefficients, or None) for x (N, d), the
        residual stream entering the layer; None if x does not suit the kernel."""
        if not (
            x.dtype is torch.float32
            and x.is_cpu
            and x.dim() == 2
            and x.shape[0] == self.rows
            and x.shape[1] == self.din
            and x.stride(1) == 1
            and not x.requires_grad
        ):
            return None
        weights = x.new_empty(self.flow, self.S)
        scales = x.new_empty(self.rows, self.width) if self.with_scales else None
        with self.lock:
            call = self.call
            call.x, call.x_stride = x.data_ptr(), x.stride(0)
            call.weights, call.scales = weights.data_ptr(), 0 if scales is None else scales.data_ptr()
            self.kernel(self.ref)
        return weights, (self.coef if scales is None else scales)


@functools.cache
def _kernel():
    return checked("flow_scales", _check)


def _check(kernel) -> bool:
    """Three rows, two of them LoRA-Flow ones (one with a padding slot and a temperature),
    against the plain computation."""
    g = torch.Generator().manual_seed(0)
    rows, S, d, width = 3, 3, 13, 5
    x = torch.randn(rows, d, generator=g)
    flow_rows = torch.tensor([0, 2])
    W, b = torch.randn(2, S, d, generator=g), torch.randn(2, S, generator=g)
    mask = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, float("-inf")]])
    temps = torch.tensor([[1.0], [0.5]])
    coef = torch.randn(rows, width, generator=g)
    slots = torch.tensor([[0, 1, 2, 3, 1], [0, 0, 0, 0, 0], [2, 0, 1, 1, 0]])
    got = FlowCall(kernel, rows, d, flow_rows, W, b, mask, temps, coef, slots).run(x)
    logits = torch.einsum("jsd,jd->js", W.double(), x[flow_rows].double()) / temps.double() + mask.double()
    weights = torch.softmax(logits, -1) + b.double()
    table = torch.ones(rows, S + 1, dtype=torch.float64)
    table[flow_rows, 1:] = weights
    scales = table.gather(1, slots) * coef.double()
    return torch.allclose(got[0].double(), weights, rtol=1e-5, atol=1e-6) and torch.allclose(
        got[1].double(), scales, rtol=1e-5, atol=1e-6
    )
