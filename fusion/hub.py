"""Hub references: `hf:owner/repo/sub/folder` (or a file) wherever a path is accepted.

Fetched with huggingface_hub when online (into its usual cache); offline, a reference that is
not cached yet fails with one sentence saying what to do.
"""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import snapshot_download

from .errors import FusionError
from .safe_io import first_line

PREFIX = "hf:"


def is_hub_ref(ref: str) -> bool:
    return isinstance(ref, str) and ref.startswith(PREFIX)


def split_ref(ref: str) -> tuple[str, str]:
    parts = ref[len(PREFIX) :].strip("/").split("/")
    if len(parts) < 2 or not all(parts[:2]):
        raise FusionError(f"hub reference {ref!r} must look like hf:owner/repo or hf:owner/repo/sub/path")
    return "/".join(parts[:2]), "/".join(parts[2:])


def download(repo_id: str, subpath: str, offline: bool) -> Path:
    patterns = None if not subpath else [subpath, f"{subpath}/*"]
    folder = snapshot_download(repo_id, allow_patterns=patterns, local_files_only=offline)
    return Path(folder) / subpath if subpath else Path(folder)


def resolve_ref(ref: str) -> str:
    """A local path for `ref`: hub references are fetched (or found in the cache)."""
    if not is_hub_ref(ref):
        return ref
    repo_id, subpath = split_ref(ref)
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    try:
        path = download(repo_id, subpath, offline)
    except Exception as exc:  # the hub client raises many types; all mean "not available"
        if offline or "connect" in str(exc).lower() or "offline" in str(exc).lower():
            raise FusionError(
                f"cannot fetch {ref} without network access: download it once while online "
                f"(huggingface-cli download {repo_id}) or pass a local path"
            ) from None
        raise FusionError(f"cannot fetch {ref}: {first_line(exc)}") from None
    if not path.exists():
        raise FusionError(f"{ref}: the repository {repo_id} has no {subpath!r}")
    return str(path)
