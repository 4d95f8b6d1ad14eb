"""File input/output that never runs pickled code and never leaves half-written files."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .errors import FusionError

MAX_JSON_BYTES = 4 * 1024 * 1024


def read_json(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FusionError(f"{path} is missing")
    if path.stat().st_size > MAX_JSON_BYTES:
        raise FusionError(f"{path} is larger than {MAX_JSON_BYTES // 1024 // 1024} MB; not a config file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise FusionError(f"{path} is not valid UTF-8 text") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise FusionError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, dict):
        raise FusionError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, or its type name when the message is empty."""
    lines = str(exc).strip().splitlines()
    return lines[0][:limit] if lines else type(exc).__name__


def load_tensor_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file, or a legacy torch pickle with weights_only=True.

    weights_only refuses any pickle that would construct arbitrary objects or call code,
    so a malicious `.bin` fails here with a clear message instead of running.
    """
    path = Path(path)
    if not path.is_file():
        raise FusionError(f"{path} is missing")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
            raise FusionError(f"{path} is not a readable safetensors file ({first_line(exc)})") from None
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise FusionError(
            f"{path} was refused: it is a pickle that holds more than tensors "
            f"(weights-only loading: {first_line(exc, 160)})"
        ) from None
    except Exception as exc:  # torch.load raises many types on bytes that are not a pickle
        raise FusionError(f"{path} is not a readable torch weights file ({first_line(exc)})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise FusionError(f"{path} must hold a dict of named tensors")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise FusionError(f"{path}: entry {bad[0]!r} is not a tensor")
    return state


@contextmanager
def atomic_folder(target: str | Path, overwrite: bool = False):
    """Yield a temporary sibling folder; on success it is renamed to `target` in one step.

    On any error the temporary folder is removed and an existing `target` is untouched.
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise FusionError(f"{target} already exists; choose another name or allow overwriting")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the result is an ordinary folder
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
