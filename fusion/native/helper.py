"""A second thread for the fusions' deltas in a decoding step (`helper.c`).

The scheduler's forwards run with one intra-op thread (`fusion.threads` says why), so on a CPU
host the other cores wait while a step runs. A mixed batch's deltas do not depend on the base
projections they are added to: a table's low-rank products of the layer input can run on a
helper thread while the calling thread computes the base projections of the same input, and
are added once both are done (`batch_layout.Table.start` and `finish`); so can a MixLoRA row's
routing and its experts' gate and up deltas (`mixlora_ffn.begin_mixture`). The helper is a C
thread (it never takes the GIL), one per calling thread, started on first use.

It serves where the C kernels do, on a host with at least two cores this process may run on,
unless LORA_STUDIO_DELTA_THREAD=0; then the same kernel call runs on the calling thread,
with the same result bit for bit (the products are computed apart and then added, either way).
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading

from ..limits import int_env
from .build import library

_local = threading.local()


class Helper:
    """The calling thread's helper: `post` kernel calls (independent of each other: they may run
    in any order, on either thread), then `wait` for all of them; waiting runs those the helper
    has not taken yet on the calling thread, so a helper kept off its core by a busy host
    costs at most the call it is in."""

    def __init__(self, lib, handle: int):
        self._lib, self._handle = lib, ctypes.c_void_p(handle)
        self._pid = os.getpid()  # a forked child holds a copy of this object but not the thread

    def post(self, function: ctypes.c_void_p, call_ref) -> bool:
        """Post function(call) (a kernel's address) to the helper; False (nothing posted) if
        8 calls are already waiting or running."""
        return self._lib.helper_post(self._handle, function, call_ref) == 0

    def wait(self) -> None:
        """Return once every call posted so far has ended."""
        self._lib.helper_wait(self._handle)

    def __del__(self):
        lib, self._lib = self._lib, None
        if lib is not None and self._pid == os.getpid():  # in a forked child: never free (leaked)
            lib.helper_free(self._handle)


@functools.cache
def _lib():
    lib = library()
    if lib is None:
        return None
    lib.helper_new.restype = ctypes.c_void_p
    lib.helper_post.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    lib.helper_wait.argtypes = [ctypes.c_void_p]
    lib.helper_wait.restype = None
    lib.helper_free.argtypes = [ctypes.c_void_p]
    return lib


def enabled() -> bool:
    """Whether deltas may run beside the base projections: two cores or more to run on and
    LORA_STUDIO_DELTA_THREAD not 0."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return cores >= 2 and int_env("LORA_STUDIO_DELTA_THREAD", 1) != 0


def _after_fork_in_child() -> None:
    """The helper threads do not exist in a forked child: the forking thread starts a new one
    on its next use (no helper is freed there: `Helper.__del__` checks the process)."""
    _local.helper = False


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def current() -> Helper | None:
    """The calling thread's helper (started on first use), or None where none serves."""
    found = getattr(_local, "helper", False)
    if found is False:
        found = None
        lib = _lib() if enabled() else None
        handle = None if lib is None else lib.helper_new()
        if handle:
            found = Helper(lib, handle)
        _local.helper = found  # freed with the thread's other locals when the thread ends
    return found
