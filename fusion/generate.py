"""Streaming generation under a fusion run, with a KV cache, sampling, stop and trace."""

from __future__ import annotations

import threading
import time

import torch

from .api import GenerationEvent, Sampling  # noqa: F401 - also imported from here
from .runtime import Run, activate
from .trace import build_trace


def _sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    """logits (V,) -> next token id."""
    if sampling.temperature <= 0:
        return int(torch.argmax(logits))
    logits = logits.float() / sampling.temperature
    if sampling.top_k:
        kth = torch.topk(logits, min(sampling.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, 0) - sorted_probs < sampling.top_p
        filtered = torch.zeros_like(probs)
        filtered[order[keep]] = sorted_probs[keep]
        probs = filtered / filtered.sum()
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


PART_OF_NEXT = "·"


def token_labels(tokenizer, ids: list[int]) -> list[str]:
    """One readable label per token for traces and heatmaps. Byte-level tokenizers split many
    characters (Chinese, emoji, some Cyrillic) over several tokens, each of which alone decodes
    to "\ufffd"; such a character is shown on the token that completes it, and the tokens
    before it read "·" (part of the next). A sequence that never completes within 4 tokens is
    shown as decoded."""
    labels: list[str] = []
    pending: list[int] = []
    for token in ids:
        pending.append(token)
        text = tokenizer.decode(pending)
        if text.endswith("\ufffd") and len(pending) < 4:
            labels.append(PART_OF_NEXT)
            continue
        labels.append(text)
        pending = []
    return labels


def stop_token_ids(tokenizer, model) -> set[int]:
    ids = set()
    for source in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(i) for i in source)
    for token in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<end_of_turn>"):
        tid = tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid is not None:
            ids.add(tid)
    return ids


@torch.inference_mode()
def stream_tokens(
    model,
    tokenizer,
    run: Run,
    prompt_ids: list[int],
    sampling: Sampling,
    cancel: threading.Event | None = None,
    record_trace: bool = True,
):
    """Yield GenerationEvents; the last one has done=True and, if asked, the trace."""
    from transformers import DynamicCache

    sampling.validate()
    device = next(model.parameters()).device
    eos = stop_token_ids(tokenizer, model)
    generator = torch.Generator().manual_seed(int(sampling.seed)) if sampling.temperature > 0 else None
    cache = DynamicCache(config=model.config)
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    generated: list[int] = []
    text = ""
    start = time.perf_counter()
    first_token_at = None
    finish = "length"
    run.record = record_trace
    with activate(run):
        logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[0, -1]
    while True:
        if cancel is not None and cancel.is_set():
            finish = "cancelled"
            break
        token = _sample(logits, sampling, generator)
        if first_token_at is None:
            first_token_at = time.perf_counter() - start
        if token in eos:
            finish = "eos"
            break
        generated.append(token)
        new_text = tokenizer.decode(generated, skip_special_tokens=True)
        stop_at = min((new_text.find(s) for s in sampling.stop if s and s in new_text), default=-1)
        if stop_at >= 0:
            new_text, finish = new_text[:stop_at], "stop"
        if not new_text.endswith("\ufffd") or finish == "stop":  # hold back half a UTF-8 character
            delta, text = new_text[len(text) :], new_text
            if delta:
                yield GenerationEvent(
                    text,
                    delta,
                    token_ids=list(generated),
                    prompt_tokens=len(prompt_ids),
                    seconds_to_first_token=first_token_at,
                )
        if finish == "stop" or len(generated) >= sampling.max_new_tokens:
            break
        with activate(run):
            logits = model(
                input_ids=torch.tensor([[token]], device=device), past_key_values=cache, use_cache=True
            ).logits[0, -1]
    elapsed = time.perf_counter() - start
    decode_time = elapsed - (first_token_at or 0.0)
    tps = (len(generated) - 1) / decode_time if len(generated) > 1 and decode_time > 0 else None
    final_text = tokenizer.decode(generated, skip_special_tokens=True)
    if finish == "stop":
        final_text = text
    trace = None
    if record_trace:
        if generated and finish not in ("cancelled",) and len(run.steps) + len(run.router_steps) > 0:
            # Feed the last token too so every token of the reply has its own trace row.
            with activate(run):
                model(input_ids=torch.tensor([[generated[-1]]], device=device), past_key_values=cache, use_cache=True)
        all_ids = list(prompt_ids) + generated
        tokens = token_labels(tokenizer, all_ids)
        trace = build_trace(run, tokens, len(prompt_ids), model.config.num_hidden_layers)
    yield GenerationEvent(
        final_text,
        final_text[len(text) :],
        done=True,
        finish_reason=finish,
        token_ids=generated,
        prompt_tokens=len(prompt_ids),
        seconds_to_first_token=first_token_at,
        tokens_per_second=tps,
        trace=trace,
    )
