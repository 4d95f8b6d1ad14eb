"""C kernels for the batched decoding step on CPU (`native.c`), compiled on first use with the
system's C compiler and loaded with ctypes.

Why: a decoding step of a batch where every row is a different fusion spends its extra time in
hundreds of small torch kernels, each paying its dispatch:
- the batch tables' low-rank products (`batch_layout.Table.apply`): in the benchmark's 8-row
  batch each row uses about a quarter of its tables' ranks (its own adapters; the others'
  coefficients are 0), and the torch path multiplies every rank for every row and then scales
  the unused ones by 0, in about 15 kernels a layer. `table_apply` does one table in one call
  and multiplies, for each row, only the ranks it uses. One q/k/v table of that batch (144
  ranks, 30 % of them used per row, one thread, warm caches): 70 us through torch, 21 us here.
- a MixLoRA row's routed FFN for one token (`mixlora_ffn._picked_mixture`): about 24 kernels a
  layer through torch; `picked_mixture` does them in one call, SiLU included.
Measured figures for whole steps are in docs/perf.md ("C kernels").

They run for float32 tensors on CPU, outside autograd: tables for up to `MAX_ROWS` rows,
MixLoRA for up to `MAX_TOKENS` tokens with a SiLU activation. Everything else takes the torch
path: prompts (many tokens: there the products are large enough for MKL), other dtypes and
devices, training, no C compiler, a build or self-check that fails, or LORA_STUDIO_NATIVE=0.
The results agree with the torch path to float32 rounding (the sums run in another order, and
SiLU's exponential is a polynomial within 2 ulp). On x86-64 Linux one build carries AVX-512,
AVX2 and baseline versions of each kernel, and the loader picks the one this CPU runs.

The library is built once per source, flags and compiler into the cache folder
(`limits.cache_dir()` / native), written under a temporary name and renamed, so a process
never loads a half-written file.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch
import torch.nn.functional as F

from .limits import cache_dir, int_env

SOURCE = Path(__file__).with_name("native.c")
FLAGS = ["-O3", "-std=c11", "-fopenmp-simd", "-fno-trapping-math", "-fPIC", "-shared"]
MAX_ROWS = 16  # above this many rows (a prompt), MKL's products are faster
MAX_TOKENS = 4  # MixLoRA tokens of one plan in a step (decoding rows), above which torch's path serves
BUILD_TIMEOUT_S = 120

log = logging.getLogger(__name__)
_P = ctypes.c_void_p


class _Call(ctypes.Structure):
    """`struct table_call` of native.c."""

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


class _Picked(ctypes.Structure):
    """`struct picked_call` of native.c."""

    _fields_ = [
        *((name, ctypes.c_int) for name in ("tokens", "picks", "din", "f", "rank", "has_gate", "has_up", "has_down")),
        ("experts", ctypes.c_int),
        ("x", _P),
        ("x_stride", ctypes.c_long),
        ("gate", _P),
        ("up", _P),
        ("gate_stride", ctypes.c_long),
        ("up_stride", ctypes.c_long),
        *((name, _P) for name in ("router", "logits", "probs", "chosen", "weights")),
        *((name, _P) for name in ("A_in", "B_gate", "B_up", "A_down", "B_down", "mixed", "down", "scratch")),
    ]


class NativeExperts:
    """The kernel's view of one layer's MixLoRA experts (`mixlora_ffn.LayerExperts`): their
    stacked factors' addresses, fixed when it is made; it holds the tensors."""

    def __init__(self, kernel, stacked: dict, experts: dict):
        self.kernel = kernel
        inputs = stacked.get("inputs", [])
        A_in = stacked.get("A_in")
        self.tensors = [A_in] + [stacked[name] for name in experts] + [experts[name][0] for name in experts]
        first = next(iter(experts.values()))[0]
        self.num_experts, self.rank = first.shape[:2]
        self.f = experts["down_proj"][0].shape[2] if "down_proj" in experts else stacked[inputs[0]].shape[2]
        self.din = A_in.shape[2] if A_in is not None else stacked["down_proj"].shape[2]
        self.has = {name: name in experts for name in ("gate_proj", "up_proj", "down_proj")}
        self.fixed = {
            "rank": self.rank,
            "f": self.f,
            "experts": self.num_experts,
            "has_gate": self.has["gate_proj"],
            "has_up": self.has["up_proj"],
            "has_down": self.has["down_proj"],
            "A_in": 0 if A_in is None else A_in.data_ptr(),
            "B_gate": stacked["gate_proj"].data_ptr() if "gate_proj" in experts else 0,
            "B_up": stacked["up_proj"].data_ptr() if "up_proj" in experts else 0,
            "A_down": experts["down_proj"][0].data_ptr() if "down_proj" in experts else 0,
            "B_down": stacked["down_proj"].data_ptr() if "down_proj" in experts else 0,
        }

    def routed(self, x, gate, up, router: torch.Tensor, top_k: int):
        """What `mixlora_ffn.expert_mixture` returns, (mixed, down, logits, probs, chosen), with
        the routing done here too; None if these tensors do not suit the kernel."""
        n = x.shape[0]
        if not (
            router.dtype == torch.float32 and router.is_contiguous() and router.shape == (self.num_experts, x.shape[1])
        ):
            return None
        if not 0 < top_k <= self.num_experts or not self._suits(x, gate, up):
            return None
        logits, probs = x.new_empty(n, self.num_experts), x.new_empty(n, self.num_experts)
        chosen, weights = torch.empty(n, top_k, dtype=torch.int64), x.new_empty(n, top_k)
        mixed, down = self._run(x, gate, up, chosen, weights, router=router, logits=logits, probs=probs)
        return mixed, down, logits, probs, chosen

    def picked(self, x, gate, up, chosen: torch.Tensor, weights: torch.Tensor):
        """What `mixlora_ffn._picked_mixture` returns, (mixed, down), for the picks given; None
        if these tensors do not suit the kernel."""
        if chosen.dtype != torch.int64 or weights.dtype != torch.float32 or not self._suits(x, gate, up, weights):
            return None
        if (
            chosen.shape != weights.shape
            or chosen.shape[0] != x.shape[0]
            or not 0 <= int(chosen.min()) <= int(chosen.max()) < self.num_experts
        ):
            return None
        return self._run(x, gate, up, chosen.contiguous(), weights.contiguous())

    def _suits(self, x, gate, up, *others) -> bool:
        return (
            x.shape[0] <= MAX_TOKENS
            and x.dtype == gate.dtype == up.dtype == torch.float32
            and x.device.type == "cpu"
            and all(t.stride(1) == 1 for t in (x, gate, up))
            and x.shape[1] == self.din
            and gate.shape == up.shape == (x.shape[0], self.f)
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in (x, gate, up, *others)))
        )

    def _run(self, x, gate, up, chosen, weights, router=None, logits=None, probs=None):
        n, din = x.shape
        mixed = x.new_empty(n, self.f)
        down = x.new_empty(n, din) if self.has["down_proj"] else None
        scratch = x.new_empty(2 * self.f + 2 * self.rank)
        call = _Picked(
            tokens=n,
            picks=chosen.shape[1],
            din=din,
            x=x.data_ptr(),
            x_stride=x.stride(0),
            gate=gate.data_ptr(),
            up=up.data_ptr(),
            gate_stride=gate.stride(0),
            up_stride=up.stride(0),
            router=0 if router is None else router.data_ptr(),
            logits=0 if logits is None else logits.data_ptr(),
            probs=0 if probs is None else probs.data_ptr(),
            chosen=chosen.data_ptr(),
            weights=weights.data_ptr(),
            mixed=mixed.data_ptr(),
            down=0 if down is None else down.data_ptr(),
            scratch=scratch.data_ptr(),
            **self.fixed,
        )
        self.kernel(ctypes.byref(call))
        return mixed, down


def experts_kernel(stacked: dict, experts: dict, act) -> NativeExperts | None:
    """The kernel for one layer's experts (module -> (A (E, r, d_in), B (E, d_out, r))) and their
    stacked forms, or None where the torch path must serve them."""
    if not experts or not _is_silu(act):
        return None
    tensors = [stacked[name] for name in experts] + [experts[name][0] for name in experts]
    if "A_in" in stacked:
        tensors.append(stacked["A_in"])
    if any(t.device.type != "cpu" or t.dtype != torch.float32 or not t.is_contiguous() for t in tensors):
        return None
    library = _library()
    return None if library is None else NativeExperts(library.picked_mixture, stacked, experts)


def _is_silu(act) -> bool:
    try:
        from transformers.activations import SiLUActivation
    except ImportError:  # older transformers
        SiLUActivation = torch.nn.SiLU
    return act is F.silu or isinstance(act, (torch.nn.SiLU, SiLUActivation))


def table_kernel(A: torch.Tensor, members: list) -> NativeTable | None:
    """The kernel for a table with these factors, or None where the torch path must serve it."""
    if A.device.type != "cpu" or A.dtype != torch.float32 or not A.is_contiguous():
        return None
    if any(Bt.dtype != torch.float32 or not Bt.is_contiguous() for *_, Bt in members):
        return None
    library = _library()
    return None if library is None else NativeTable(library.table_apply, A, members)


def available() -> bool:
    return _library() is not None


@functools.cache
def _library():
    """The loaded kernels, or None (with one warning saying why) when they cannot be used."""
    if int_env("LORA_STUDIO_NATIVE", 1) == 0:
        return None
    try:
        library = _load(_build())
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        log.warning("C kernels unavailable, using the torch path: %s", error)
        return None
    if not (_check_table(library.table_apply) and _check_picked(library.picked_mixture)):
        log.warning("C kernels disagree with the torch path on this machine; using the torch path")
        return None
    return library


def _compiler_or_none() -> str | None:
    """CC if set (and found), else the first of cc, gcc, clang on the PATH."""
    names = [os.environ["CC"]] if os.environ.get("CC") else ["cc", "gcc", "clang"]
    return next((shutil.which(name) for name in names if shutil.which(name)), None)


def _compiler() -> str:
    compiler = _compiler_or_none()
    if compiler is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc)")
    return compiler


def _build() -> Path:
    compiler = _compiler()
    source = SOURCE.read_bytes()
    version = subprocess.run([compiler, "--version"], capture_output=True, timeout=30).stdout
    key = hashlib.sha256(b"\0".join([source, " ".join(FLAGS).encode(), version, platform.machine().encode()]))
    folder = cache_dir() / "native"
    path = folder / f"kernels-{key.hexdigest()[:16]}.so"
    if path.exists():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".kernels-", suffix=".so", dir=folder)
    os.close(fd)
    try:
        done = subprocess.run(
            [compiler, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=BUILD_TIMEOUT_S
        )
        if done.returncode != 0:
            raise RuntimeError(f"{Path(compiler).name} failed: {done.stderr.strip().splitlines()[-1:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _load(path: Path):
    library = ctypes.CDLL(str(path))
    library.table_apply.argtypes = [ctypes.POINTER(_Call)]
    library.table_apply.restype = ctypes.c_int
    library.picked_mixture.argtypes = [ctypes.POINTER(_Picked)]
    library.picked_mixture.restype = None
    return library


def _check_table(kernel) -> bool:
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


def _check_picked(kernel) -> bool:
    """Two tokens, two picks each, through the kernel against the plain computation."""
    g = torch.Generator().manual_seed(0)
    E, r, d, f = 3, 2, 11, 7
    experts = {
        name: (torch.randn(E, r, n_in, generator=g), torch.randn(E, n_out, r, generator=g))
        for name, n_in, n_out in (("gate_proj", d, f), ("up_proj", d, f), ("down_proj", f, d))
    }
    stacked = {name: B.transpose(1, 2).contiguous() for name, (_, B) in experts.items()}
    stacked["A_in"] = torch.cat([experts["gate_proj"][0], experts["up_proj"][0]], 1)
    x, gate, up = torch.randn(2, d, generator=g), torch.randn(2, f, generator=g), torch.randn(2, f, generator=g)
    chosen, weights = torch.tensor([[2, 0], [1, 2]]), torch.rand(2, 2, generator=g)
    got = NativeExperts(kernel, stacked, experts).picked(x, gate, up, chosen, weights)
    mixed, down = torch.zeros(2, f, dtype=torch.float64), torch.zeros(2, d, dtype=torch.float64)
    for n in range(2):
        for p in range(2):
            e, w = int(chosen[n, p]), float(weights[n, p])
            lora = {name: (A[e].double(), B[e].double()) for name, (A, B) in experts.items()}
            gt = gate[n].double() + lora["gate_proj"][1] @ (lora["gate_proj"][0] @ x[n].double())
            ut = up[n].double() + lora["up_proj"][1] @ (lora["up_proj"][0] @ x[n].double())
            m = F.silu(gt) * ut
            mixed[n] += w * m
            down[n] += w * (lora["down_proj"][1] @ (lora["down_proj"][0] @ m))
    return torch.allclose(got[0].double(), mixed, rtol=1e-5, atol=1e-5) and torch.allclose(
        got[1].double(), down, rtol=1e-5, atol=1e-5
    )
