"""The batch tables' low-rank products (`batch_layout.Table.apply`) for a decoding step's few
rows: `table_apply` of kernels.c, each row multiplying only the ranks it uses."""

from __future__ import annotations

import ctypes
import functools
import threading

import torch

from . import helper
from .build import checked, library

MAX_ROWS = 16  # above this many rows (a prompt), MKL's products are faster

_P = ctypes.c_void_p
_F32 = torch.float32


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
    """The kernel's view of one table: the addresses of its factors and of its own output
    buffers, fixed when it is made (it holds the tensors, so they stay alive). One call at a
    time: `start` takes a lock that `finish` releases. The checks of each call are few and
    cheap: a decoding step makes 4 calls a layer."""

    def __init__(self, kernel, add, A: torch.Tensor, members: list):
        self.kernel, self.add = kernel, add
        self.function = ctypes.cast(kernel, _P)
        self.names = [name for name, *_ in members]
        self.douts = [Bt.shape[1] for *_, Bt in members]
        self.din, self.width = A.shape[1], A.shape[0]
        self.out = [torch.empty(MAX_ROWS, d, dtype=torch.float32) for d in self.douts]  # the products
        self.tensors = [A] + [Bt for *_, Bt in members]
        count = len(members)
        self.starts = (ctypes.c_int * count)(*[start for _, start, _, _ in members])
        self.ends = (ctypes.c_int * count)(*[end for _, _, end, _ in members])
        self.dout = (ctypes.c_int * count)(*self.douts)
        self.Bt = (_P * count)(*[Bt.data_ptr() for *_, Bt in members])
        self.y = (_P * count)(*[out.data_ptr() for out in self.out])
        self.y_stride = (ctypes.c_long * count)(*self.douts)
        self.h = torch.empty(MAX_ROWS, A.shape[0], dtype=torch.float32)
        call = self.call = _Call()
        call.din, call.width, call.members, call.A = self.din, self.width, count, A.data_ptr()
        call.start, call.end, call.dout, call.Bt = (
            ctypes.cast(a, _P) for a in (self.starts, self.ends, self.dout, self.Bt)
        )
        call.y, call.y_stride = ctypes.cast(self.y, _P), ctypes.cast(self.y_stride, _P)
        call.h = self.h.data_ptr()
        self.ref = ctypes.byref(call)
        self.dst = (_P * count)()  # finish: the projections' outputs
        self.lock = threading.Lock()
        self.helper, self.result = None, None

    def start(self, x: torch.Tensor, scales: torch.Tensor, column: int, helper) -> bool:
        """Begin this table's products for x (rows, d_in) with the per-rank scales in columns
        column.. of scales (rows, W), into the table's own buffers: on `helper` (a
        `helper.Helper`) if given, else here and now. True if begun; then `finish` must follow,
        in the same thread. False (nothing begun) if these tensors do not suit the kernel:
        float32 on CPU, contiguous, outside autograd, at most MAX_ROWS rows."""
        rows = x.shape[0]
        if not (
            x.dtype is _F32
            and scales.dtype is _F32
            and x.is_cpu
            and scales.is_cpu
            and x.dim() == scales.dim() == 2
            and rows <= MAX_ROWS
            and x.shape[1] == self.din
            and scales.shape[0] == rows
            and 0 <= column <= scales.shape[1] - self.width
            and x.is_contiguous()
            and scales.is_contiguous()
            and not (x.requires_grad or scales.requires_grad)
        ):
            return False
        self.lock.acquire()
        try:
            call = self.call
            call.rows, call.x, call.x_stride = rows, x.data_ptr(), self.din
            call.scale, call.scale_stride = scales.data_ptr() + 4 * column, scales.shape[1]
            self.helper = helper if helper is not None and helper.post(self.function, self.ref) else None
            if self.helper is None:
                self.result = self.kernel(self.ref)
        except BaseException:
            self.helper = None
            self.lock.release()
            raise
        return True

    def finish(self, ys: dict | None) -> None:
        """Wait for the products `start` began and add them to ys (module -> (rows, d_out));
        ys None: drop them (the base projections failed)."""
        try:
            if self.helper is not None:
                self.helper.wait()
            if ys is None:
                return
            if self.helper is None and self.result != 0:
                raise RuntimeError("table_apply refused a call it was checked for")
            rows, dst = self.call.rows, self.dst
            outs = [ys[name] for name in self.names]
            for name, y, d in zip(self.names, outs, self.douts):
                if y.shape != (rows, d):
                    raise ValueError(f"{name}: the table's products are ({rows}, {d}), its output is {tuple(y.shape)}")
            if not all(y.dtype is _F32 and y.is_contiguous() and not y.requires_grad for y in outs):
                for y, out in zip(outs, self.out):  # another dtype or layout: torch adds
                    y.add_(out[:rows].to(y.dtype))
                return
            for i, y in enumerate(outs):
                dst[i] = y.data_ptr()
            self.add(self.ref, dst)
        finally:
            self.helper = None
            self.lock.release()


def table_kernel(A: torch.Tensor, members: list) -> NativeTable | None:
    """The kernel for a table with these factors, or None where the torch path must serve it."""
    if A.device.type != "cpu" or A.dtype != torch.float32 or not A.is_contiguous():
        return None
    if any(Bt.dtype != torch.float32 or not Bt.is_contiguous() for *_, Bt in members):
        return None
    if A.requires_grad or any(Bt.requires_grad for *_, Bt in members):
        return None
    kernels = _kernels()
    return None if kernels is None else NativeTable(*kernels, A, members)


@functools.cache
def _kernels():
    """(table_apply, table_add), or None if the library is missing or fails the check."""
    kernel = checked("table_apply", _check)
    return None if kernel is None else (kernel, library().table_add)


def _check(kernel) -> bool:
    """One small table through the kernel against the plain products, every branch of it (rows
    in fours and alone, unused ranks, two members, columns of a wider scales), on this thread
    and on the helper."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(6, 37, generator=g)
    members = [("a", 0, 4, torch.randn(4, 19, generator=g)), ("b", 4, 6, torch.randn(2, 5, generator=g))]
    x = torch.randn(7, 37, generator=g)
    scale = torch.randn(7, 6, generator=g) * (torch.arange(42).view(7, 6) % 3 != 0)
    h = (x.double() @ A.double().t()) * scale.double()
    want = {"a": h[:, :4] @ members[0][3].double(), "b": h[:, 4:] @ members[1][3].double()}
    table = NativeTable(kernel, library().table_add, A, members)
    scales = torch.cat([torch.randn(7, 3, generator=g), scale, torch.randn(7, 2, generator=g)], 1)
    for beside in (None, helper.current()):
        ys = {"a": torch.ones(7, 19), "b": torch.ones(7, 5)}
        if not table.start(x, scales, 3, beside):
            return False
        table.finish(ys)
        if not all(torch.allclose(ys[k].double(), want[k] + 1, rtol=1e-5, atol=1e-5) for k in ys):
            return False
    return True
