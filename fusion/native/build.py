"""Building and loading the C kernels (`kernels.c`): compiled on first use with the system's C
compiler into the cache folder (`limits.cache_dir()` / native), once per source, flags and
compiler, written under a temporary name and renamed, so a process never loads a half-written
file. No compiler, a failed build, or LORA_STUDIO_NATIVE=0: no library, and the torch paths
serve."""

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
from pathlib import Path

from ..limits import cache_dir, int_env

SOURCES = [Path(__file__).with_name(name) for name in ("kernels.c", "helper.c")]
FLAGS = ["-O3", "-std=c11", "-fopenmp-simd", "-fno-trapping-math", "-fPIC", "-shared", "-pthread"]
BUILD_TIMEOUT_S = 120

log = logging.getLogger("fusion.native")


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded library, or None (with one warning saying why) when it cannot be had."""
    if int_env("LORA_STUDIO_NATIVE", 1) == 0:
        return None
    try:
        return ctypes.CDLL(str(build()))
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        log.warning("C kernels unavailable, using the torch path: %s", error)
        return None


def checked(name: str, check) -> object | None:
    """The library's function `name` if `check(function)` passes on this machine, else None
    (with a warning): a kernel that disagrees with the plain computation is never used."""
    lib = library()
    if lib is None:
        return None
    kernel = getattr(lib, name)
    if not check(kernel):
        log.warning("C kernel %s disagrees with the torch path on this machine; using the torch path", name)
        return None
    return kernel


def compiler_or_none() -> str | None:
    """CC if set (and found), else the first of cc, gcc, clang on the PATH."""
    names = [os.environ["CC"]] if os.environ.get("CC") else ["cc", "gcc", "clang"]
    return next((shutil.which(name) for name in names if shutil.which(name)), None)


def _compiler() -> str:
    compiler = compiler_or_none()
    if compiler is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc)")
    return compiler


def build() -> Path:
    """The library's path, compiled first unless this source, flags and compiler already were;
    a new build replaces the earlier ones in the folder."""
    compiler = _compiler()
    sources = [path.read_bytes() for path in SOURCES]
    version = subprocess.run([compiler, "--version"], capture_output=True, timeout=30).stdout
    key = hashlib.sha256(b"\0".join([*sources, " ".join(FLAGS).encode(), version, platform.machine().encode()]))
    folder = cache_dir() / "native"
    path = folder / f"kernels-{key.hexdigest()[:16]}.so"
    if path.exists():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".kernels-", suffix=".so", dir=folder)
    os.close(fd)
    try:
        done = subprocess.run(
            [compiler, *FLAGS, *map(str, SOURCES), "-o", tmp], capture_output=True, text=True, timeout=BUILD_TIMEOUT_S
        )
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
            raise RuntimeError(f"{Path(compiler).name} failed: {last}")
        os.replace(tmp, path)
        for stale in folder.glob("kernels-*.so"):  # builds of earlier sources or compilers
            if stale != path:
                stale.unlink(missing_ok=True)  # a process that loaded one keeps its mapping
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
