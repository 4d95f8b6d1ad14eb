"""Which base model reads the target languages? ``python -m lab base-compare``.

For each model (the embedded SmolLM2-135M-Instruct, or a GGUF file / model folder), measured
the same way, without any LoRA:

* **bits per character** on target-language prose it was not asked anything about (Debian
  paragraphs, docs/data.md): how well it predicts the language; lower is better;
* **tokens per character** of that prose (what a reply costs);
* **replies in the language** to the twelve everyday questions per language of
  ``evaluate_lang`` (greedy, 48 tokens), and how many of those do not merely repeat the question;
* **math** accuracy on the first n evaluation problems per language (greedy, 64 tokens);
* load and generation seconds.

GGUF files are dequantized by transformers' loader (never trusting remote code). Replies come
from transformers' ``generate``, one question at a time, not from the engine's scheduler: the
models compared here need not be Llama-family models the engine can serve (Gemma 3 is not).
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import torch

LANGS = ("es", "ru", "zh")


def load(spec: str):
    """(model, tokenizer, name, load seconds) for "default", a .gguf file or a model folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fusion.model import dense_default_copy

    start = time.perf_counter()
    if spec == "default":
        folder, kwargs, name = dense_default_copy(), {}, "SmolLM2-135M-Instruct"
    elif spec.endswith(".gguf"):
        path = Path(spec).expanduser()
        folder, kwargs, name = path.parent, {"gguf_file": path.name}, path.stem
    else:
        folder, kwargs, name = Path(spec).expanduser(), {}, Path(spec).name
    tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=torch.float32, trust_remote_code=False, **kwargs
    ).eval()
    return model, tokenizer, name, time.perf_counter() - start


def stop_ids(tokenizer) -> list[int]:
    """End of sequence plus the end-of-turn token of chat formats that have one (Gemma's
    <end_of_turn>, ChatML's <|im_end|>)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for token in ("<end_of_turn>", "<|im_end|>"):
        tid = tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            ids.add(tid)
    return sorted(ids)


@torch.no_grad()
def bits_per_char(model, tokenizer, texts: list[str]) -> tuple[float, float]:
    """(bits per character, tokens per character) of the texts, each scored on its own."""
    nats, chars, tokens = 0.0, 0, 0
    for text in texts:
        ids = tokenizer(text, return_tensors="pt").input_ids  # (1, T), with BOS where the model uses one
        logits = model(input_ids=ids).logits[0, :-1].float()  # (T-1, V)
        nats += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        chars += len(text)
        tokens += len(tokenizer(text, add_special_tokens=False).input_ids)
    return nats / chars / math.log(2), tokens / chars


def chat_prompt(tokenizer, question: str) -> torch.Tensor:
    """The model's own chat template; Gemma's GGUF carries none, so its documented turn format."""
    if tokenizer.chat_template:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=True, add_generation_prompt=True, return_tensors="pt"
        )
        return prompt["input_ids"] if hasattr(prompt, "keys") else prompt
    if "<start_of_turn>" in tokenizer.get_vocab():
        text = f"<start_of_turn>user\n{question}<end_of_turn>\n<start_of_turn>model\n"
        return tokenizer(text, return_tensors="pt").input_ids  # BOS added by the tokenizer
    raise ValueError("the tokenizer has no chat template and no known turn format")


@torch.no_grad()
def replies(model, tokenizer, questions: list[str], max_new_tokens: int) -> tuple[list[str], float]:
    """Greedy chat replies, one question at a time; returns (replies, seconds per new token)."""
    stops = stop_ids(tokenizer)
    out, new_tokens, start = [], 0, time.perf_counter()
    for question in questions:
        ids = chat_prompt(tokenizer, question)  # (1, T)
        generated = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=stops,
            pad_token_id=tokenizer.pad_token_id or stops[0],
        )[0, ids.shape[1] :]
        new_tokens += len(generated)
        out.append(tokenizer.decode(generated, skip_special_tokens=True).strip())
    return out, (time.perf_counter() - start) / max(1, new_tokens)


def prose(lang: str, n: int, seed: int = 0) -> list[str]:
    from .debian_text import parallel_paragraphs

    texts = [xx.text for _, xx in parallel_paragraphs(lang)]
    random.Random(f"prose:{lang}:{seed}").shuffle(texts)
    return texts[:n]


def measure(spec: str, n_prose: int = 60, n_math: int = 24, n_questions: int = 12, log=print) -> dict:
    from fusion.math_data import eval_examples

    from .evaluate_lang import QUESTIONS, in_language, is_echo
    from .scoring import score_reply

    model, tokenizer, name, load_s = load(spec)
    result = {
        "model": name,
        "spec": spec,
        "parameters": sum(p.numel() for p in model.parameters()),
        "load_seconds": round(load_s, 1),
        "langs": {},
    }
    for lang in ("en",) + LANGS:
        row = {}
        if lang != "en":
            bpc, tpc = bits_per_char(model, tokenizer, prose(lang, n_prose))
            row.update(bits_per_char=round(bpc, 3), tokens_per_char=round(tpc, 3))
            if n_questions:
                questions = QUESTIONS[lang][:n_questions]
                answers, _ = replies(model, tokenizer, questions, 48)
                row["in_language"] = sum(in_language(r, lang) for r in answers)
                row["in_language_not_echo"] = sum(
                    in_language(r, lang) and not is_echo(q, r) for q, r in zip(questions, answers)
                )
                row["questions"] = len(answers)
                row["example_answer"] = answers[0][:160]
        if not n_math:
            result["langs"][lang] = row
            log(json.dumps({"model": name, "lang": lang, **row}, ensure_ascii=False))
            continue
        problems = eval_examples(lang, n_math)
        answers, sec_per_token = replies(model, tokenizer, [p.question for p in problems], 64)
        scores = [score_reply(r, p.value, lang) for p, r in zip(problems, answers)]
        row.update(
            math_correct=sum(s["correct"] for s in scores),
            math_joint=sum(s["joint"] for s in scores),
            math_n=len(scores),
            seconds_per_token=round(sec_per_token, 4),
            example_reply=answers[0][:160],
        )
        result["langs"][lang] = row
        log(json.dumps({"model": name, "lang": lang, **row}, ensure_ascii=False))
    return result


def table(results: list[dict]) -> str:
    lines = [
        "| model | params | lang | bits/char | tokens/char | replies in language (not echo) | "
        "math right | right and in language | s/token |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for lang, row in r["langs"].items():
            replied = (
                f"{row['in_language']}/{row['questions']} ({row['in_language_not_echo']})"
                if "in_language" in row
                else "—"
            )
            math_cells = (
                f"{row['math_correct']}/{row['math_n']} | {row['math_joint']}/{row['math_n']} | "
                f"{row['seconds_per_token']}"
                if "math_n" in row
                else "— | — | —"
            )
            lines.append(
                f"| {r['model']} | {r['parameters'] / 1e6:.0f}M | {lang} | {row.get('bits_per_char', '—')} | "
                f"{row.get('tokens_per_char', '—')} | {replied} | {math_cells} |"
            )
    return "\n".join(lines)
