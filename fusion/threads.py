"""Intra-op threads of the calling thread only, for the scheduler's forwards on CPU.

Why: a decode step of a small model is hundreds of small kernels, most of them matmuls that
MKL and ATen run as OpenMP parallel regions. Every Python thread that has run a parallel op
keeps its own OpenMP team, and as soon as the process holds more OpenMP threads than it has
cores (the main thread's team plus the scheduler's already do on 2 cores), libgomp stops
spin-waiting between regions and puts the team's threads to sleep: each region then pays a
futex wake-up. Measured on 2 cores, an 8-row mixed decode step took 238 ms on the scheduler's
thread with 2 threads, 122 ms with 2 threads on the main thread (no second team), and 132 ms
on the scheduler's thread with 1 thread, which has no region to wait for. Forwards with
prompts suffer most where they are made of many small ops: a 128-token MixLoRA prompt (its
experts' loop) took 1022 ms with 2 threads on the scheduler's thread and 540 ms with one
(a base prompt: 353 and 435 ms). So the scheduler's forwards run with one thread by default.

`torch.set_num_threads` cannot do this: it also changes the default that every thread created
later starts with. OpenMP's `omp_set_num_threads` and MKL's `mkl_set_num_threads_local` are
per thread; they are called through the libraries torch has already loaded. Where they cannot
be found (another platform or build), `local_threads` changes nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os

import torch

from .limits import int_env


@functools.cache
def _setters():
    """(omp_get_max_threads, omp_set_num_threads, MKL_Set_Num_Threads_Local) or None. (MKL's
    lower-case `mkl_set_num_threads_local` symbol is its Fortran entry, which takes a pointer.)"""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if line.rstrip().endswith(".so") or ".so." in line}
    except OSError:
        return None
    gomp = next((p for p in paths if os.path.basename(p).startswith("libgomp")), None)
    torch_cpu = next((p for p in paths if os.path.basename(p) == "libtorch_cpu.so"), None)
    if gomp is None or torch_cpu is None:
        return None
    try:
        omp, mkl = ctypes.CDLL(gomp), ctypes.CDLL(torch_cpu)
        return omp.omp_get_max_threads, omp.omp_set_num_threads, mkl.MKL_Set_Num_Threads_Local
    except (OSError, AttributeError):
        return None


def decode_threads(device: torch.device) -> int | None:
    """Threads for the scheduler's forwards on this device: LORA_STUDIO_DECODE_THREADS (0:
    torch's own setting), by default 1 on CPU; None (leave as is) on other devices."""
    if device.type != "cpu":
        return None
    n = int_env("LORA_STUDIO_DECODE_THREADS", 1)
    return n if n > 0 else None


@contextlib.contextmanager
def local_threads(n: int | None):
    """Run the body with n intra-op threads in the calling thread only, then restore."""
    setters = _setters() if n is not None else None
    if setters is None:
        yield
        return
    get_omp, set_omp, set_mkl = setters
    torch.get_num_threads()  # torch's per-thread first-use setup, so that it cannot undo ours
    before = get_omp()
    if before == n:
        yield
        return
    set_omp(n)
    set_mkl(n)
    try:
        yield
    finally:
        set_omp(before)
        set_mkl(before)
