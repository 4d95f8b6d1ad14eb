"""C kernels for the batched decoding step on CPU (`kernels.c`), compiled on first use with the
system's C compiler and loaded with ctypes.

Why: a decoding step of a batch where every row is a different fusion spends its extra time in
hundreds of small torch kernels, each paying its dispatch:
- the batch tables' low-rank products (`batch_layout.Table.apply`): in the benchmark's 8-row
  batch each row uses about a quarter of its tables' ranks (its own adapters; the others'
  coefficients are 0), and the torch path multiplies every rank for every row and then scales
  the unused ones by 0, in about 15 kernels a layer. `table_apply` does one table in one call
  and multiplies, for each row, only the ranks it uses. One q/k/v table of that batch (144
  ranks, 30 % of them used per row, one thread, warm caches): 70 us through torch, 21 us here.
- a MixLoRA row's routing and routed FFN for one token (`mixlora_ffn.expert_mixture`): about
  30 kernels a layer through torch; `picked_mixture` does them in one call, SiLU included.
- the LoRA-Flow rows' gates and every row's per-rank scales (`batch_layout.Layout.gate`,
  `LayerTables.scales`): about 10 kernels a layer; `flow_scales` does them in one call.
Whole steps, measured: docs/perf.md ("C kernels for decoding steps").

They run for float32 tensors on CPU, outside autograd: the tables and gates of decoding steps
(up to `MAX_ROWS` rows, one token each), MixLoRA's routed FFN for any number of tokens with a
SiLU activation. Everything else takes the torch path: prompts' tables and gates, other dtypes
and devices, training, no C compiler, a build or self-check that fails, or
LORA_STUDIO_NATIVE=0. A prompt's tables stay with MKL although the kernel is faster when the
prompt uses few of a table's ranks (a prompt joining other fusions' rows): MKL computes a
prompt's low-rank products exactly as the solo run does, and the kernel's different rounding
grew, over 30 layers, into router probabilities 2e-5 away from the solo run's, beyond the
1e-5 the traces are held to.
The results agree with the torch path to float32 rounding (the sums run in another order, and
SiLU's exponential is a polynomial within 2 ulp). On x86-64 Linux one build carries AVX-512,
AVX2 and baseline versions of each kernel, and the loader picks the one this CPU runs.

On a host with two cores or more, a decoding step runs the tables' products and a MixLoRA
row's routing and gate/up deltas on a helper thread (`helper`) while the calling thread
computes the base projections they are added to; one core, or LORA_STUDIO_DELTA_THREAD=0,
runs the same calls on the calling thread, with the same result bit for bit.

The library is built once per source, flags and compiler into the cache folder
(`limits.cache_dir()` / native), written under a temporary name and renamed, so a process
never loads a half-written file.
"""

from __future__ import annotations

from . import build, experts, gates, helper, tables
from .experts import NativeExperts, experts_kernel
from .gates import flow_call
from .tables import MAX_ROWS, NativeTable, table_kernel

__all__ = [
    "MAX_ROWS",
    "NativeExperts",
    "NativeTable",
    "available",
    "experts_kernel",
    "flow_call",
    "forget_loaded",
    "table_kernel",
]


def available() -> bool:
    """Whether the library is built and loaded (each kernel also passes its own check)."""
    return build.library() is not None


def forget_loaded() -> None:
    """Load the library and check the kernels again on next use (after the environment changed)."""
    for cached in (build.library, tables._kernels, experts._kernel, gates._kernel, helper._lib):
        cached.cache_clear()
