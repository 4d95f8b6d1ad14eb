"""The batch tables' low-rank products (`batch_layout.Table.apply`) for a decoding step's few
rows: `table_apply` of kernels.c, each row multiplying only the ranks it uses."""

from __future__ import annotations

import ctypes
import functools
import threading

import torch

from .build import checked

MAX_ROWS = 16  # above this many rows (a prompt), MKL's products are faster

_P = ctypes.c_void_p


class _Call(ctypes.Structure):
    """`struct table_call` of kernels.c."""

    _fields_ = [
        ("rows", ctypes.c_int),
        ("din", ctypes.c_int),
        ("width", ctypes.c_int),
        ("members", ctypes.c_int),
        ("x", _P),
        ("x_stride", ctypes.c_long),
        ("A", _P),
        ("scale", _P),
        ("scale_stride", ctypes.c_long),
        ("start", _P),
        ("end", _P),
        ("dout", _P),
        ("Bt", _P),
        ("y", _P),
        ("y_stride", _P),
        ("h", _P),
    ]


class NativeTable:
    """The kernel's view of one table: the addresses of its factors, fixed when it is made (it
    holds the tensors, so they stay alive). One call at a time (a lock guards the call record
    and the scratch it reuses)."""

    def __init__(self, kernel, A: torch.Tensor, members: list):
        self.kernel = kernel
        self.names = [name for name, *_ in members]
        self.tensors = [A] + [Bt for *_, Bt in members]
        count = len(members)
        self.start = (ctypes.c_int * count)(*[start for _, start, _, _ in members])
        self.end = (ctypes.c_int * count)(*[end for _, _, end, _ in members])
        self.dout = (ctypes.c_int * count)(*[Bt.shape[1] for *_, Bt in members])
        self.Bt = (_P * count)(*[Bt.data_ptr() for *_, Bt in members])
        self.y = (_P * count)()
        self.y_stride = (ctypes.c_long * count)()
        self.h = torch.empty(MAX_ROWS, A.shape[0], dtype=torch.float32)
        call = self.call = _Call()
        call.din, call.width, call.members, call.A = A.shape[1], A.shape[0], count, A.data_ptr()
        call.start, call.end, call.dout, call.Bt = (
            ctypes.cast(a, _P) for a in (self.start, self.end, self.dout, self.Bt)
        )
        call.y, call.y_stride = ctypes.cast(self.y, _P), ctypes.cast(self.y_stride, _P)
        call.h = self.h.data_ptr()
        self.ref = ctypes.byref(call)
        self.lock = threading.Lock()

    def apply(self, x: torch.Tensor, ys: dict, scale: torch.Tensor) -> bool:
        """What `Table.apply` does, if these tensors suit the kernel; False (nothing done) if not."""
        outs = [ys[name] for name in self.names]
        rows = x.shape[0]
        if not (
            rows <= MAX_ROWS
            and x.shape[1] == self.call.din
            and scale.shape == (rows, self.call.width)
            and all(y.shape == (rows, d) for y, d in zip(outs, self.dout))
            and x.dtype == scale.dtype == torch.float32
            and x.device.type == "cpu"
            and x.stride(1) == 1
            and scale.stride(1) == 1
            and not (torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad))
            and all(y.dtype == torch.float32 and y.stride(1) == 1 and not y.requires_grad for y in outs)
        ):
            return False
        with self.lock:
            for i, y in enumerate(outs):
                self.y[i] = y.data_ptr()
                self.y_stride[i] = y.stride(0)
            call = self.call
            call.rows, call.x, call.x_stride = rows, x.data_ptr(), x.stride(0)
            call.scale, call.scale_stride = scale.data_ptr(), scale.stride(0)
            return self.kernel(self.ref) == 0


def table_kernel(A: torch.Tensor, members: list) -> NativeTable | None:
    """The kernel for a table with these factors, or None where the torch path must serve it."""
    if A.device.type != "cpu" or A.dtype != torch.float32 or not A.is_contiguous():
        return None
    if any(Bt.dtype != torch.float32 or not Bt.is_contiguous() for *_, Bt in members):
        return None
    if A.requires_grad or any(Bt.requires_grad for *_, Bt in members):
        return None
    kernel = _kernel()
    return None if kernel is None else NativeTable(kernel, A, members)


@functools.cache
def _kernel():
    return checked("table_apply", _check)


def _check(kernel) -> bool:
    """One small table through the kernel against the plain products, every branch of it (rows
    in fours and alone, unused ranks, two members)."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(6, 37, generator=g)
    members = [("a", 0, 4, torch.randn(4, 19, generator=g)), ("b", 4, 6, torch.randn(2, 5, generator=g))]
    x = torch.randn(7, 37, generator=g)
    scale = torch.randn(7, 6, generator=g) * (torch.arange(42).view(7, 6) % 3 != 0)
    ys = {"a": torch.zeros(7, 19), "b": torch.zeros(7, 5)}
    if not NativeTable(kernel, A, members).apply(x, ys, scale):
        return False
    h = (x.double() @ A.double().t()) * scale.double()
    want = {"a": h[:, :4] @ members[0][3].double(), "b": h[:, 4:] @ members[1][3].double()}
    return all(torch.allclose(ys[k].double(), want[k], rtol=1e-5, atol=1e-5) for k in ys)
