"""The web app's limits and defaults in one place; each can be overridden by an environment variable.

Input limits the engine enforces itself (prompt length, new tokens, adapters per request) live
in `fusion.limits`; this module holds what only the web app decides.
"""

import os
from dataclasses import dataclass
from pathlib import Path

from fusion.limits import LIMITS, int_env


@dataclass(frozen=True)
class AppLimits:
    concurrency: int = int_env("LORA_STUDIO_CONCURRENCY", 2)  # events running at once
    queue_size: int = int_env("LORA_STUDIO_QUEUE_SIZE", 32)  # events waiting at most
    default_new_tokens: int = int_env("LORA_STUDIO_DEFAULT_NEW_TOKENS", 128)
    max_new_tokens: int = LIMITS.max_new_tokens
    max_prompt_chars: int = LIMITS.max_prompt_chars
    max_compare: int = LIMITS.max_compare  # side-by-side columns
    min_param_controls: int = 3  # generic parameter controls per method panel (grows with the registry)
    prompt_tail: int = int_env("LORA_STUDIO_PROMPT_TAIL", 12)  # prompt tokens shown before the reply
    max_score_problems: int = int_env("LORA_STUDIO_MAX_SCORE_PROBLEMS", 48)
    max_fit_chars: int = int_env("LORA_STUDIO_MAX_FIT_CHARS", 4_000_000)  # pasted or uploaded JSONL
    max_upload_mb: int = int_env("LORA_STUDIO_MAX_UPLOAD_MB", 512)  # one uploaded file (adapter zip, JSONL)


APP = AppLimits()

NONE = "(none)"  # the "no adapter" choice of the language and task pickers
PREFERRED = {"language": "lang-es", "task": "task-math", "method": "lora_flow"}
# Example questions the chat offers (written by `python -m lab examples`): each with the fusion
# that answers it right and in its language; shown only when that fusion is in the library.
CHAT_EXAMPLES = Path(
    os.environ.get("LORA_STUDIO_CHAT_EXAMPLES", Path(__file__).resolve().parents[1] / "assets" / "chat_examples.json")
)
