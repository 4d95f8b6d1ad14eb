"""A request as the scheduler holds it: its ticket (what the caller sees), and its row (sampling
state, KV cache, text so far), which turns each new token into the caller's events exactly as
`generate.stream_tokens` does for a solo run."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .batched import RowCache
from .generate import GenerationEvent, Sampling, _sample, token_labels
from .runtime import FusionPlan, Run
from .trace import build_trace


@dataclass
class Ticket:
    """A submitted request as its caller sees it: its events, and where it stands."""

    events: queue.Queue[GenerationEvent | BaseException] = field(default_factory=queue.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)
    state: str = "queued"  # queued | running | done
    position: int = 0  # 1 = next to be admitted, while queued


class Row:
    """One request inside the scheduler: its sampling state, cache, text so far and events."""

    def __init__(
        self,
        ticket: Ticket,
        plan: FusionPlan,
        prompt_ids: list[int],
        sampling: Sampling,
        record: bool,
        user_cancel: threading.Event | None,
    ):
        self.ticket, self.plan, self.prompt_ids, self.sampling = ticket, plan, list(prompt_ids), sampling
        self.record, self.user_cancel = record, user_cancel
        self.generator = torch.Generator().manual_seed(int(sampling.seed)) if sampling.temperature > 0 else None
        self.generated: list[int] = []
        self.text = ""
        self.finish = "length"
        self.start = time.perf_counter()
        self.first_token_at: float | None = None
        self.run: Run | None = None
        self.cache: RowCache | None = None
        self.next_token = -1
        self.closing = False  # fed once more for its last token's trace row, then done
        self.kv_bytes = 0
        self.solo: Iterator[GenerationEvent] | None = None  # its own decode loop, on an unbatched model
        self.solo_cancel = threading.Event()

    def cancelled(self) -> bool:
        return self.ticket.cancel.is_set() or (self.user_cancel is not None and self.user_cancel.is_set())

    def advance(self, logits: torch.Tensor, greedy: int, tokenizer, eos: set[int]) -> bool:
        """One new token from the row's logits (V,), as `generate.stream_tokens` does; False when
        the row is done (its caller then ends it)."""
        if self.cancelled():
            self.finish = "cancelled"
            return False
        s = self.sampling
        token = greedy if s.temperature <= 0 else _sample(logits, s, self.generator)
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter() - self.start
        if token in eos:
            self.finish = "eos"
            return False
        self.generated.append(token)
        new_text = tokenizer.decode(self.generated, skip_special_tokens=True)
        stop_at = min((new_text.find(x) for x in s.stop if x and x in new_text), default=-1)
        if stop_at >= 0:
            new_text, self.finish = new_text[:stop_at], "stop"
        if not new_text.endswith("\ufffd") or self.finish == "stop":  # hold back half a UTF-8 character
            delta, self.text = new_text[len(self.text) :], new_text
            if delta:
                self.ticket.events.put(
                    GenerationEvent(
                        self.text,
                        delta,
                        token_ids=list(self.generated),
                        prompt_tokens=len(self.prompt_ids),
                        seconds_to_first_token=self.first_token_at,
                    )
                )
        if self.finish == "stop" or len(self.generated) >= s.max_new_tokens:
            if self.record and (self.run.steps or self.run.router_steps):
                self.closing, self.next_token = True, self.generated[-1]  # its trace row needs one more feed
                return True
            return False
        self.next_token = token
        return True

    def end(self, tokenizer, layers: int) -> None:
        """Its last event: the whole text, why it ended, speed, and the trace if recorded."""
        elapsed = time.perf_counter() - self.start
        decode_time = elapsed - (self.first_token_at or 0.0)
        n = len(self.generated)
        tps = (n - 1) / decode_time if n > 1 and decode_time > 0 else None
        final = self.text if self.finish == "stop" else tokenizer.decode(self.generated, skip_special_tokens=True)
        trace = None
        if self.record and self.run is not None:
            ids = self.prompt_ids + self.generated
            trace = build_trace(self.run, token_labels(tokenizer, ids), len(self.prompt_ids), layers)
        self.cache = None
        self.ticket.state = "done"
        self.ticket.events.put(
            GenerationEvent(
                final,
                final[len(self.text) :],
                done=True,
                finish_reason=self.finish,
                token_ids=self.generated,
                prompt_tokens=len(self.prompt_ids),
                seconds_to_first_token=self.first_token_at,
                tokens_per_second=tps,
                trace=trace,
            )
        )
