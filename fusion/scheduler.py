"""Continuous batching: one loop decodes every request of an engine, whatever its fusion.

Requests join the running batch between decode steps: their prompts go through the same
forward as the running rows' next tokens (`batched.decode_step`: one forward per step over
every row's new tokens, each row attending over its own cache, its prompt's trace recorded as
in a solo run), up to `max_prompt_tokens_per_step` prompt tokens a step; then they decode with
the others (on CPU every forward runs with one intra-op thread by default, see `threads`). A row
leaves as soon as it stops (end of text, stop string, max tokens, cancel); the rest go on.
Each row keeps its own sampling, random generator, stop tokens and trace. Rows beyond the
cap on rows or on KV memory wait in a queue; their callers see where they stand.

A static fusion is merged into the weights while it is the only fusion in the batch (exact
restore afterwards); as soon as another fusion joins, the weights are restored and every row
runs unmerged.

A model whose layers `batched.decode_step` does not compute (`batched.supports`: e.g. Gemma 3,
or a sliding window) still goes through this loop, queue and caps, but each of its rows decodes
through the model's own forward (`generate.stream_tokens`), the rows taking turns a token at a time.
"""

from __future__ import annotations

import atexit
import queue
import threading
import weakref
from collections import Counter, deque
from collections.abc import Iterator
from contextlib import ExitStack

import torch

from .batched import RowCache, decode_step, supports
from .generate import GenerationEvent, Sampling, stop_token_ids, stream_tokens
from .layouts import Layouts
from .packed import MIN_ROWS, packed_weights
from .runtime import FusionPlan, ModelLock, Run, merged_into
from .scheduler_rows import Row, Ticket
from .threads import decode_threads, local_threads


class Scheduler:
    def __init__(
        self,
        model,
        tokenizer,
        lock: ModelLock | None = None,
        merge_static: bool = True,
        max_rows: int = 16,
        kv_budget_bytes: int | None = None,
        max_prompt_tokens_per_step: int = 2048,
    ):
        """tokenizer: the tokenizer, or a function giving the current one (an engine's may change)."""
        self.model = model
        self.batched = supports(model)  # else every row decodes alone, in turns (module docstring)
        self._tokenizer = tokenizer if callable(tokenizer) and not hasattr(tokenizer, "decode") else (lambda: tokenizer)
        self.lock = lock or ModelLock()
        self.merge_static = merge_static and self.batched
        self.max_rows = max(1, int(max_rows))
        self.kv_budget = kv_budget_bytes
        self.max_prompt_tokens_per_step = max(1, int(max_prompt_tokens_per_step))
        self.dtype = next(model.parameters()).dtype
        self.device = next(model.parameters()).device
        self.decode_threads = decode_threads(self.device)  # intra-op threads of a decode step (`threads`)
        self.eos: set[int] | None = None  # on first use: engines without a tokenizer never generate
        self._eos_of = None
        self._cond = threading.Condition()
        self._pending: deque[Row] = deque()
        self._running: list[Row] = []
        self._thread: threading.Thread | None = None
        self._held = ExitStack()  # the model lock (shared, or exclusive with a merge) while busy
        self._holding: str | None = None  # None | "shared" | "merged"
        self._merged: tuple[FusionPlan, FusionPlan] | None = None  # (plan, its merged stand-in)
        self._layouts = Layouts()
        self._closed = False
        _open_schedulers.add(self)
        self.steps = 0  # decode forwards so far (each serves every running row)
        self.rows_per_step: Counter[int] = Counter()  # decode forwards by how many rows they served

    @property
    def tokenizer(self):
        return self._tokenizer()

    # ---- the callers' side ---------------------------------------------------------------------
    def submit(
        self,
        plan: FusionPlan,
        prompt_ids: list[int],
        sampling: Sampling,
        cancel: threading.Event | None = None,
        record_trace: bool = True,
    ) -> Ticket:
        sampling.validate()
        if self._closed:
            raise RuntimeError("the engine's scheduler is closed; start a new engine")
        if self._eos_of is not self.tokenizer:
            self.eos, self._eos_of = stop_token_ids(self.tokenizer, self.model), self.tokenizer
        ticket = Ticket()
        row = Row(ticket, plan, prompt_ids, sampling, record_trace, cancel)
        row.kv_bytes = RowCache.bytes_for(self.model.config, len(prompt_ids) + sampling.max_new_tokens + 1, self.dtype)
        with self._cond:
            self._pending.append(row)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="fusion-scheduler", daemon=True)
                self._thread.start()
            self._cond.notify_all()
        return ticket

    def stream(
        self,
        plan: FusionPlan,
        prompt_ids: list[int],
        sampling: Sampling,
        cancel: threading.Event | None = None,
        record_trace: bool = True,
    ) -> Iterator[GenerationEvent]:
        """Submit and yield the request's events; closing the iterator early cancels the row.
        While the request waits for room, events with `queued` = its place in the queue come first."""
        ticket = self.submit(plan, prompt_ids, sampling, cancel, record_trace)
        done, shown = False, 0
        try:
            while True:
                try:
                    item = ticket.events.get(timeout=0.1)
                except queue.Empty:
                    place = ticket.position if ticket.state == "queued" else 0
                    if place and place != shown:
                        shown = place
                        yield GenerationEvent("", "", prompt_tokens=len(prompt_ids), queued=place)
                    continue
                if isinstance(item, BaseException):
                    done = True
                    raise item
                done = item.done
                yield item
                if done:
                    return
        finally:
            if not done:
                ticket.cancel.set()
                with self._cond:
                    self._cond.notify_all()

    def finals(
        self,
        plan: FusionPlan,
        prompts: list[list[int]],
        sampling: Sampling,
        cancel: threading.Event | None = None,
        record_trace: bool = False,
    ) -> Iterator[GenerationEvent]:
        """Submit every prompt at once (they decode together, beyond the caps they queue) and yield
        each one's last event in the prompts' order; closing the iterator early cancels the rest."""
        tickets = [self.submit(plan, ids, sampling, cancel, record_trace) for ids in prompts]
        try:
            for ticket in tickets:
                while True:
                    item = ticket.events.get()
                    if isinstance(item, BaseException):
                        raise item
                    if item.done:
                        yield item
                        break
        finally:
            unfinished = [t for t in tickets if t.state != "done"]
            for ticket in unfinished:
                ticket.cancel.set()
            if unfinished:
                with self._cond:
                    self._cond.notify_all()

    def status(self) -> dict:
        with self._cond:
            return {
                "running": len(self._running),
                "queued": len(self._pending),
                "max_rows": self.max_rows,
                "kv_bytes": sum(r.kv_bytes for r in self._running),
                "kv_budget_bytes": self.kv_budget,
                "merged": None if self._merged is None else self._merged[0].method,
            }

    def close(self, timeout: float = 30.0) -> None:
        """Stop the loop after its current step: waiting and running rows end as cancelled, the
        weights are restored and the loop's thread exits (waited for up to `timeout` s). Run at
        interpreter exit, so that no forward is still inside torch while the process tears down."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    # ---- the loop ----------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._running and not self._closed:
                    self._release_model()
                    self._cond.wait()
                if self._closed:
                    left = [*self._pending, *self._running]
                    self._pending.clear()
                    self._running = []
                    break
                admitted = self._admit()
            rows = self._running + admitted
            try:
                self._step(admitted)
            except BaseException as exc:  # a failed forward fails the rows in it, not the loop
                for row in rows:
                    if row.ticket.state != "done":
                        row.ticket.state = "done"
                        row.ticket.events.put(exc)
                with self._cond:
                    self._running = []
                self._release_model()
        for row in left:
            if row.ticket.state != "done":
                row.finish = "cancelled"
                self._end(row)
        self._release_model()

    def _admit(self) -> list[Row]:
        """Rows that fit now, in arrival order; cancelled waiting rows leave at once. Under _cond."""
        out: list[Row] = []
        used = sum(r.kv_bytes for r in self._running)
        prompt_tokens = 0
        while self._pending and len(self._running) + len(out) < self.max_rows:
            row = self._pending[0]
            if row.cancelled():
                self._pending.popleft()
                row.finish = "cancelled"
                self._end(row)
                continue
            busy = self._running or out
            if busy and self.kv_budget is not None and used + row.kv_bytes > self.kv_budget:
                break
            if out and prompt_tokens + len(row.prompt_ids) > self.max_prompt_tokens_per_step:
                break  # the next step takes it: one forward holds the others' tokens back
            prompt_tokens += len(row.prompt_ids)
            self._pending.popleft()
            row.ticket.state, row.ticket.position = "running", 0
            used += row.kv_bytes
            out.append(row)
        for place, row in enumerate(self._pending, 1):
            row.ticket.position = place
        return out

    def _step(self, admitted: list[Row]) -> None:
        """One forward: the running rows' next tokens and the admitted rows' whole prompts."""
        self._arrange_model(self._running + admitted)
        if not self.batched:
            with local_threads(self.decode_threads):
                self._solo_turns(admitted)
            return
        running = [r for r in self._running if not self._retire_if_cancelled(r)]
        for row in admitted:
            row.run = Run(self._compute_plan(row.plan), record=row.record)
            capacity = len(row.prompt_ids) + row.sampling.max_new_tokens + 1
            row.cache = RowCache.empty(self.model.config, capacity, self.device, self.dtype)
        rows = running + admitted
        with self._cond:
            self._running = rows
        if not rows:
            return
        with local_threads(self.decode_threads):  # see `threads`
            self._forward(rows, len(running))

    def _forward(self, rows: list[Row], decoding: int) -> None:
        """rows[:decoding] feed their next token, the rest their prompt."""
        # A prompt under a merge reads the original weights, packed, plus the fusion's tables:
        # merged weights are not packed (`packed`). A 128-token prompt of a merged fusion took
        # 12-14 % longer than the base model's through the merged weights, 3-11 % this way
        # (single and linear k=2, 10 interleaved pairs, one thread, embedded model).
        # Decoding (a row at a time) reads the merged weights.
        original = (
            self._merged is not None
            and any(len(r.prompt_ids) >= MIN_ROWS for r in rows[decoding:])
            and packed_weights(self.model).enabled
        )
        plans = [r.plan if original else self._compute_plan(r.plan) for r in rows]
        layout = self._layouts.get(self.model, plans)
        feeds = [[r.next_token] for r in rows[:decoding]] + [r.prompt_ids for r in rows[decoding:]]
        tokens = torch.tensor([t for feed in feeds for t in feed], dtype=torch.long, device=self.device)
        runs = [r.run if r.record else None for r in rows]
        caches = [r.cache for r in rows]
        logits = decode_step(
            self.model, layout, tokens, caches, runs, [len(f) for f in feeds], original_weights=original
        )  # (N, V)
        self.steps += 1
        self.rows_per_step[len(rows)] += 1
        greedy = logits.argmax(-1).tolist()
        still = []
        for i, row in enumerate(rows):
            if row.closing:
                self._end(row)
            elif row.advance(logits[i], greedy[i], self.tokenizer, self.eos):
                still.append(row)
            else:
                self._end(row)
        with self._cond:
            self._running = still

    def _solo_turns(self, admitted: list[Row]) -> None:
        """On a model `decode_step` does not compute: every row, in turn, runs its own decode loop
        until its next event (a new piece of text, or its end)."""
        for row in admitted:
            run = Run(row.plan, record=row.record)
            row.solo = stream_tokens(
                self.model, self.tokenizer, run, row.prompt_ids, row.sampling, row.solo_cancel, row.record
            )
        rows = self._running + admitted
        with self._cond:
            self._running = rows
        still = []
        for row in rows:
            if row.cancelled():
                row.solo_cancel.set()  # its loop stops at once and gives its last event
            event = next(row.solo)
            if event.done:
                row.ticket.state = "done"
            row.ticket.events.put(event)
            if not event.done:
                still.append(row)
        with self._cond:
            self._running = still

    def _retire_if_cancelled(self, row: Row) -> bool:
        if row.closing or not row.cancelled():
            return False
        row.finish = "cancelled"
        self._end(row)
        return True

    def _end(self, row: Row) -> None:
        row.end(self.tokenizer, self.model.config.num_hidden_layers)

    # ---- the model's weights -------------------------------------------------------------------------
    def _compute_plan(self, plan: FusionPlan) -> FusionPlan:
        return self._merged[1] if self._merged is not None and self._merged[0] is plan else plan

    def _arrange_model(self, rows: list[Row]) -> None:
        """Merge the batch's fusion into the weights when it is the only one and static;
        otherwise hold the model shared (unmerged)."""
        plans = {id(r.plan): r.plan for r in rows}
        target = None
        if self.merge_static and len(plans) == 1:
            plan = next(iter(plans.values()))
            target = plan if plan.is_static and plan.deltas else None
        if self._holding == "merged" and self._merged[0] is target:
            return
        if self._holding == "shared" and target is None:
            return
        self._release_model()
        if target is not None and self.lock.try_exclusive():
            self._held.callback(self.lock.release_exclusive)
            merged = self._held.enter_context(merged_into(self.model, target))
            self._merged, self._holding = (target, merged), "merged"
            return
        self.lock.acquire_shared()
        self._held.callback(self.lock.release_shared)
        self._holding = "shared"

    def _release_model(self) -> None:
        if self._holding is not None:
            self._held.close()
            self._held = ExitStack()
        self._holding, self._merged = None, None
        self._layouts.release()


_open_schedulers: weakref.WeakSet[Scheduler] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for scheduler in list(_open_schedulers):
        scheduler.close()
