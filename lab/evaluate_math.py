"""Greedy exact-match accuracy on the templated math problems.

Works with any causal LM that has ``generate`` (a plain transformers model, a peft model, or a
model with fusion hooks installed): prompts are chat-formatted with the tokenizer's template,
generated greedily in left-padded batches, and scored on the final number of the reply.
"""

from __future__ import annotations

import time

import torch

from fusion.math_scoring import final_number, is_correct  # noqa: F401  (the lab's scorer)


@torch.no_grad()
def generate_replies(
    model, tokenizer, questions: list[str], batch_size: int = 16, max_new_tokens: int = 64
) -> list[str]:
    """Greedy replies to single-turn user questions, in left-padded batches."""
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    replies = []
    try:
        for i in range(0, len(questions), batch_size):
            prompts = [
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
                )
                for q in questions[i : i + batch_size]
            ]
            enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(next(model.parameters()).device) for k, v in enc.items()}
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            for row in out[:, enc["input_ids"].shape[1] :]:
                replies.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    finally:
        tokenizer.padding_side = old_side
    return replies


def evaluate_math(
    model,
    tokenizer,
    lang: str = "en",
    n: int = 48,
    seed: int = 0,
    batch_size: int = 16,
    max_new_tokens: int = 64,
    examples=None,
) -> dict:
    """Accuracy on ``n`` evaluation problems in ``lang`` (or on the given examples)."""
    from fusion.math_data import eval_examples

    exs = examples if examples is not None else eval_examples(lang, n, seed=seed)
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    replies = generate_replies(model, tokenizer, [e.question for e in exs], batch_size, max_new_tokens)
    if was_training:
        model.train()
    items = [
        {
            "template": e.template,
            "question": e.question,
            "expected": e.value,
            "reply": r,
            "got": final_number(r),
            "correct": is_correct(r, e.value),
        }
        for e, r in zip(exs, replies)
    ]
    correct = sum(it["correct"] for it in items)
    return {
        "lang": lang,
        "n": len(items),
        "correct": correct,
        "accuracy": correct / max(1, len(items)),
        "seconds": round(time.perf_counter() - t0, 1),
        "items": items,
    }
