"""The adapter library: LoRA and MixLoRA folders plus fitted fusions, scanned from disk.

A folder that fails to load is listed in `errors` (one sentence each) instead of stopping
start-up. Imports and saves go through a temporary folder and one rename, so the library never
shows a half-written entry.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
import uuid
import zipfile
from collections.abc import Callable
from pathlib import Path

from .adapters import load_lora
from .artifacts import FusionArtifact, load_artifact, save_artifact
from .errors import FusionError
from .hub import is_hub_ref, resolve_ref
from .safe_io import atomic_folder, read_json

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ADAPTERS_DIR = REPO_ROOT / "assets" / "adapters"
DEFAULT_FUSIONS_DIR = REPO_ROOT / "assets" / "fusions"
MAX_IMPORT_BYTES = 512 * 1024 * 1024
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")

# peft_type -> loader(folder, name, model). MixLoRA registers itself on import.
ADAPTER_LOADERS: dict[str, Callable] = {"LORA": load_lora}


def register_loader(peft_type: str, loader: Callable) -> None:
    ADAPTER_LOADERS[peft_type.upper()] = loader


def check_name(name: str) -> str:
    if not name or len(name) > 80 or not set(name) <= _NAME_CHARS or name.startswith("."):
        raise FusionError(f"name {name!r} is not allowed: use 1-80 letters, digits, '-', '_' or '.'")
    return name


def load_adapter_folder(folder: Path, name: str | None, model) -> object:
    config = read_json(folder / "adapter_config.json")
    peft_type = str(config.get("peft_type", "LORA")).upper()
    loader = ADAPTER_LOADERS.get(peft_type)
    if loader is None:
        raise FusionError(
            f"{folder}: adapter type {peft_type!r} is not supported (supported: {', '.join(ADAPTER_LOADERS)})"
        )
    return loader(folder, name or folder.name, model)


def some(names, shown: int = 6) -> str:
    """A few names for an error line; a large library is not listed in full."""
    names = [n for n in names if not Path(n).is_absolute()]
    more = len(names) - shown
    return ", ".join(names[:shown]) + (f" and {more} more" if more > 0 else "")


class Library:
    def __init__(
        self,
        model,
        adapters_dir: str | Path | None = None,
        fusions_dir: str | Path | None = None,
        device=None,
        dtype=None,
    ):
        self.model = model
        self.adapters_dir = Path(adapters_dir) if adapters_dir else DEFAULT_ADAPTERS_DIR
        self.fusions_dir = Path(fusions_dir) if fusions_dir else DEFAULT_FUSIONS_DIR
        self.device, self.dtype = device, dtype
        self.adapters: dict[str, object] = {}
        self.fusions: dict[str, FusionArtifact] = {}
        self.errors: dict[str, str] = {}
        self.version = 0  # bumped on every change so cached plans can be invalidated
        self._lock = threading.RLock()
        self.rescan()

    def _place(self, adapter):
        if self.device is not None and hasattr(adapter, "to"):
            adapter.to(self.device, self.dtype)
        return adapter

    def rescan(self) -> None:
        with self._lock:
            adapters, fusions, errors = {}, {}, {}
            if self.adapters_dir.is_dir():
                for folder in sorted(self.adapters_dir.iterdir()):
                    if folder.name.startswith(".") or not (folder / "adapter_config.json").is_file():
                        continue
                    try:
                        adapters[folder.name] = self._place(load_adapter_folder(folder, folder.name, self.model))
                    except FusionError as exc:
                        errors[folder.name] = str(exc)
            if self.fusions_dir.is_dir():
                for folder in sorted(self.fusions_dir.iterdir()):
                    if folder.name.startswith(".") or not (folder / "fusion.json").is_file():
                        continue
                    try:
                        artifact = load_artifact(folder)
                    except FusionError as exc:
                        errors[folder.name] = str(exc)
                        continue
                    unloaded = [a for a in artifact.adapters if a in errors]
                    if unloaded:  # e.g. a library made for another base model
                        errors[folder.name] = (
                            f"fusion {folder.name} uses {', '.join(unloaded)}, which did not load for this base model"
                        )
                    else:
                        fusions[folder.name] = artifact
            self.adapters, self.fusions, self.errors = adapters, fusions, errors
            self.version += 1

    def get_adapter(self, ref: str):
        """An adapter by library name, folder path or hub reference (hf:owner/repo/sub),
        loaded and validated on first use."""
        with self._lock:
            if ref in self.adapters:
                return self.adapters[ref]
        if is_hub_ref(ref):
            ref = resolve_ref(ref)
        with self._lock:
            path = Path(ref).expanduser()
            if path.is_dir():
                key = str(path.resolve())
                if key not in self.adapters:
                    self.adapters[key] = self._place(load_adapter_folder(path, path.name, self.model))
                return self.adapters[key]
        if ref in self.errors:
            raise FusionError(self.errors[ref])
        raise FusionError(
            f"adapter {ref!r} is neither in the library ({some(self.adapters) or 'empty'}) nor an existing folder"
        )

    def get_fusion(self, ref: str) -> FusionArtifact:
        with self._lock:
            if ref in self.fusions:
                return self.fusions[ref]
        path = Path(ref).expanduser()
        if path.is_dir():
            return load_artifact(path)
        raise FusionError(
            f"fitted fusion {ref!r} is neither in the library "
            f"({some(self.fusions) or 'none yet'}) nor an existing folder"
        )

    def remove(self, name: str, kind: str) -> None:
        """Delete a saved fusion (kind "fusion") or a library adapter (kind "adapter") by name.
        An adapter that saved fusions use is kept: those fusions would stop loading."""
        check_name(name)
        with self._lock:
            if kind == "fusion" and name in self.fusions:
                folder = self.fusions_dir / name
            elif kind == "adapter" and (name in self.adapters or name in self.errors):
                users = sorted(f.name for f in self.fusions.values() if name in f.adapters)
                if users:
                    raise FusionError(
                        f"adapter {name!r} is used by the saved fusion{'s' if len(users) > 1 else ''} "
                        f"{', '.join(users)}; delete {'them' if len(users) > 1 else 'it'} first"
                    )
                folder = self.adapters_dir / name
            else:
                raise FusionError(f"there is no {kind} named {name!r} in the library")
            if not folder.is_dir():
                raise FusionError(f"the {kind} {name!r} has no folder in the library to delete")
            # Renamed aside first, so a half-deleted folder is never scanned as an entry.
            aside = folder.with_name(f".deleting-{name}-{uuid.uuid4().hex[:8]}")
            folder.rename(aside)
            shutil.rmtree(aside, ignore_errors=True)
            self.rescan()

    def summaries(self) -> list[dict]:
        with self._lock:
            return [a.summary() for name, a in self.adapters.items() if not Path(name).is_absolute()]

    def save_fusion(self, artifact: FusionArtifact, overwrite: bool = False) -> FusionArtifact:
        check_name(artifact.name)
        with self._lock:
            save_artifact(artifact, self.fusions_dir / artifact.name, overwrite=overwrite)
            self.fusions[artifact.name] = load_artifact(self.fusions_dir / artifact.name)
            self.version += 1
            return self.fusions[artifact.name]

    def save_adapter(self, name: str, write: Callable[[Path], None], overwrite: bool = False):
        """Write a new adapter with `write(folder)` into the library, atomically, then load it."""
        check_name(name)
        with self._lock:
            with atomic_folder(self.adapters_dir / name, overwrite=overwrite) as tmp:
                write(tmp)
                load_adapter_folder(tmp, name, self.model)  # refuse to publish what cannot load
            adapter = self._place(load_adapter_folder(self.adapters_dir / name, name, self.model))
            self.adapters[name] = adapter
            self.errors.pop(name, None)
            self.version += 1
            return adapter

    def import_adapter(
        self, source: str | Path, name: str | None = None, role: str | None = None, overwrite: bool = False
    ):
        """Validate a peft adapter folder or zip against the base model, then copy it in."""
        source = Path(source)
        with tempfile.TemporaryDirectory() as scratch:
            folder = source
            if source.is_file() and zipfile.is_zipfile(source):
                folder = _safe_extract(source, Path(scratch))
            elif not source.is_dir():
                raise FusionError(f"{source} is neither an adapter folder nor a zip file")
            name = check_name(name or source.stem)
            adapter = load_adapter_folder(folder, name, self.model)  # validates before anything is copied
            with self._lock, atomic_folder(self.adapters_dir / name, overwrite=overwrite) as tmp:
                for item in folder.iterdir():
                    if item.is_file() and item.name in (
                        "adapter_config.json",
                        "adapter_model.safetensors",
                        "adapter_model.bin",
                        "studio.json",
                        "README.md",
                    ):
                        shutil.copy2(item, tmp / item.name)
                if role:
                    meta = read_json(tmp / "studio.json") if (tmp / "studio.json").is_file() else {}
                    meta["role"] = role
                    (tmp / "studio.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
        with self._lock:
            adapter = self._place(load_adapter_folder(self.adapters_dir / name, name, self.model))
            self.adapters[name] = adapter
            self.errors.pop(name, None)
            self.version += 1
            return adapter


def _safe_extract(archive: Path, into: Path) -> Path:
    """Extract a zip refusing absolute paths, `..` components, links and oversized content."""
    with zipfile.ZipFile(archive) as zf:
        total = 0
        for info in zf.infolist():
            parts = Path(info.filename).parts
            if info.filename.startswith(("/", "\\")) or ".." in parts or ":" in info.filename:
                raise FusionError(f"{archive.name}: entry {info.filename!r} points outside the archive; refused")
            if (info.external_attr >> 16) & 0o170000 == 0o120000:
                raise FusionError(f"{archive.name}: entry {info.filename!r} is a symbolic link; refused")
            total += info.file_size
            if total > MAX_IMPORT_BYTES:
                raise FusionError(f"{archive.name} unpacks to more than {MAX_IMPORT_BYTES >> 20} MB; refused")
        zf.extractall(into)
    configs = list(into.rglob("adapter_config.json"))
    if len(configs) != 1:
        raise FusionError(f"{archive.name} must contain exactly one adapter_config.json, found {len(configs)}")
    return configs[0].parent
