"""Input limits and the cache folder in one place; each can be overridden by an environment
variable."""

import os
from dataclasses import dataclass
from pathlib import Path


def int_env(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def cache_dir() -> Path:
    """Folder for derived files (the dense copy of the default model, the built C kernel)."""
    root = os.environ.get("LORA_STUDIO_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lora-studio"
    )
    return Path(root)


@dataclass(frozen=True)
class Limits:
    max_prompt_chars: int = int_env("LORA_STUDIO_MAX_PROMPT_CHARS", 16_000)
    max_prompt_tokens: int = int_env("LORA_STUDIO_MAX_PROMPT_TOKENS", 4_096)
    max_new_tokens: int = int_env("LORA_STUDIO_MAX_NEW_TOKENS", 1_024)
    max_adapters: int = int_env("LORA_STUDIO_MAX_ADAPTERS", 8)
    max_fit_examples: int = int_env("LORA_STUDIO_MAX_FIT_EXAMPLES", 20_000)
    max_compare: int = 4
    max_batch_rows: int = int_env("LORA_STUDIO_MAX_BATCH_ROWS", 32)  # requests decoding together; more wait
    kv_budget_mb: int = int_env("LORA_STUDIO_KV_BUDGET_MB", 4096)  # KV memory of the running rows


LIMITS = Limits()
