"""Shared training machinery: examples from JSONL, answer-only loss, a cancellable loop.

Methods that learn something (LoRA-Flow gates, CAT logits, MixLoRA experts) express what they
train as tensors inside a plan; the loop rebuilds the plan from those tensors each step, runs
the frozen base model under it, and steps an AdamW optimiser with the paper's schedule.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import FusionError
from .runtime import FusionPlan, Run, activate

MAX_EXAMPLE_TOKENS = 1024


@dataclass
class Example:
    input_ids: torch.Tensor  # (T,) long
    answer_mask: torch.Tensor  # (T,) bool: True on the tokens the loss is taken on


def parse_records(text: str, source: str = "data") -> list[dict]:
    """JSONL of {"prompt", "response"} or {"messages": [...]} records."""
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise FusionError(f"{source} line {number} is not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise FusionError(f"{source} line {number} must be a JSON object")
        if "messages" in record:
            messages = record["messages"]
            if (
                not isinstance(messages, list)
                or not messages
                or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages)
                or messages[-1]["role"] != "assistant"
            ):
                raise FusionError(
                    f"{source} line {number}: messages must be a list of "
                    "{role, content} ending with an assistant turn"
                )
        elif not (isinstance(record.get("prompt"), str) and isinstance(record.get("response"), str)):
            raise FusionError(
                f"{source} line {number} needs string fields 'prompt' and 'response' (or a 'messages' list)"
            )
        records.append(record)
    if not records:
        raise FusionError(f"{source} holds no examples")
    return records


def load_records(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FusionError(f"data file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise FusionError(f"data file {path} is not UTF-8 text") from None
    return parse_records(text, str(path))


def record_messages(record: dict, system: str | None = None) -> list[dict]:
    if "messages" in record:
        return list(record["messages"])
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [
        {"role": "user", "content": record["prompt"]},
        {"role": "assistant", "content": record["response"]},
    ]


def encode_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)


def tokenize_records(tokenizer, records: list[dict], system: str | None = None) -> list[Example]:
    """Chat-format each record; the loss mask covers the last assistant reply and its end token."""
    examples = []
    for record in records:
        messages = record_messages(record, system)
        prompt_ids = encode_chat(tokenizer, messages[:-1], add_generation_prompt=True)
        full_ids = encode_chat(tokenizer, messages, add_generation_prompt=False)
        if full_ids[: len(prompt_ids)] != prompt_ids:
            raise FusionError(
                "the chat template does not extend the prompt with the reply; cannot locate the answer tokens"
            )
        # Keep the answer's end-of-turn token in the loss but not trailing newlines after it.
        answer_end = len(full_ids)
        while (
            answer_end > len(prompt_ids) + 1 and tokenizer.decode(full_ids[answer_end - 1 : answer_end]).strip() == ""
        ):
            answer_end -= 1
        full_ids = full_ids[:answer_end][:MAX_EXAMPLE_TOKENS]
        mask = torch.zeros(len(full_ids), dtype=torch.bool)
        mask[len(prompt_ids) :] = True
        if not mask.any():
            continue
        examples.append(Example(torch.tensor(full_ids, dtype=torch.long), mask))
    if not examples:
        raise FusionError("no example has answer tokens left after truncation")
    return examples


def collate(batch: list[Example], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad: ids (B, T), attention (B, T), labels (B, T) with -100 off the answer."""
    length = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(batch), length), dtype=torch.long)
    labels = torch.full((len(batch), length), -100, dtype=torch.long)
    for row, example in enumerate(batch):
        n = len(example.input_ids)
        ids[row, :n] = example.input_ids
        attention[row, :n] = 1
        labels[row, :n] = torch.where(example.answer_mask, example.input_ids, torch.tensor(-100))
    return ids.to(device), attention.to(device), labels.to(device)


def answer_loss(model, run: Run | None, batch: list[Example], pad_id: int, device) -> torch.Tensor:
    """Mean cross-entropy over the answer tokens of a batch, under `run`'s fusion."""
    ids, attention, labels = collate(batch, pad_id, device)
    with activate(run):
        logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits  # (B, T, V)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


@torch.no_grad()
def mean_answer_loss(
    model, run: Run | None, examples: list[Example], pad_id: int, device, batch_size: int = 8
) -> float:
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        ids, attention, labels = collate(batch, pad_id, device)
        with activate(run):
            logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits
        losses = F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum"
        )
        total += losses.item()
        count += int((labels[:, 1:] != -100).sum())
    return total / max(count, 1)


@dataclass
class TrainConfig:
    epochs: int = 5  # LoRA-Flow paper: 5 epochs
    lr: float = 1e-3  # paper: 1e-3 (1e-4 for some pairs)
    batch_size: int = 4
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_ratio: float = 0.2
    grad_clip: float = 1.0
    seed: int = 0
    max_steps: int = 0  # 0 = epochs decide


@dataclass
class Progress:
    step: int
    total_steps: int
    loss: float
    lr: float
    seconds: float
    epoch: int
    losses: list[float] = field(default_factory=list)


def cosine_lr(step: int, total: int, warmup: int, peak: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train(
    model,
    parameters: list[torch.Tensor],
    make_plan: Callable[[], FusionPlan],
    examples: list[Example],
    config: TrainConfig,
    pad_id: int,
    device,
    on_progress: Callable[[Progress], None] | None = None,
    cancel: threading.Event | None = None,
    extra_loss: Callable[[Run], torch.Tensor] | None = None,
    dev: list[Example] | None = None,
    dev_losses: list[float] | None = None,
) -> list[float]:
    """AdamW + warmup/cosine + clipping over `parameters`; returns the per-step losses.

    With `dev` examples, the mean answer loss on them is measured after every epoch (appended
    to `dev_losses`) and `parameters` end at the epoch with the lowest dev loss, the
    checkpoint choice of LoRA-Flow's paper. Cancelling stops after the current step; what was
    learnt so far (or the best dev epoch) stays in `parameters`.
    """
    dev_losses = [] if dev_losses is None else dev_losses
    best: dict = {}

    def check_dev() -> None:
        loss = mean_answer_loss(model, Run(make_plan()), dev, pad_id, device)
        dev_losses.append(loss)
        if not best or loss < best["loss"]:
            best.update(loss=loss, values=[p.detach().clone() for p in parameters])

    def keep_best() -> None:
        if best:
            with torch.no_grad():
                for p, v in zip(parameters, best["values"]):
                    p.copy_(v)

    losses = _train_loop(
        model,
        parameters,
        make_plan,
        examples,
        config,
        pad_id,
        device,
        on_progress,
        cancel,
        extra_loss,
        check_dev if dev else None,
    )
    keep_best()
    return losses


def _train_loop(
    model, parameters, make_plan, examples, config, pad_id, device, on_progress, cancel, extra_loss, end_of_epoch
) -> list[float]:
    if not examples:
        raise FusionError("no training examples")
    generator = torch.Generator().manual_seed(config.seed)
    steps_per_epoch = math.ceil(len(examples) / config.batch_size)
    total = steps_per_epoch * config.epochs
    if config.max_steps:
        total = min(total, config.max_steps)
    warmup = max(1, int(round(total * config.warmup_ratio)))
    optimiser = torch.optim.AdamW(parameters, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    losses: list[float] = []
    start = time.perf_counter()
    step = 0
    for epoch in range(config.epochs):
        order = torch.randperm(len(examples), generator=generator).tolist()
        epoch_start = step
        for first in range(0, len(order), config.batch_size):
            if step >= total or (cancel is not None and cancel.is_set()):
                # A partial last epoch (a step cap, a cancel) is still a checkpoint to judge.
                if end_of_epoch is not None and step > epoch_start:
                    end_of_epoch()
                return losses
            batch = [examples[i] for i in order[first : first + config.batch_size]]
            lr = cosine_lr(step, total, warmup, config.lr)
            for group in optimiser.param_groups:
                group["lr"] = lr
            run = Run(make_plan())
            loss = answer_loss(model, run, batch, pad_id, device)
            if extra_loss is not None:
                loss = loss + extra_loss(run)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(parameters, config.grad_clip)
            optimiser.step()
            losses.append(loss.item())
            step += 1
            if on_progress is not None:
                on_progress(Progress(step, total, losses[-1], lr, time.perf_counter() - start, epoch, losses))
        if end_of_epoch is not None:
            end_of_epoch()
    return losses
