"""Train one LoRA on chat-formatted examples, resumably, on CPU.

* Each example is a list of chat messages; the loss covers the last (assistant) message and its
  end-of-turn token only.
* The batch of step i is a pure function of (seed, i), so a run killed at any point and resumed
  from its last checkpoint sees exactly the batches it would have seen.
* A checkpoint (LoRA weights, optimizer, scheduler, step, elapsed wall and CPU seconds) is written
  atomically into ``runs/<name>/checkpoint.pt`` every ``checkpoint_every`` steps.
* The finished adapter is written as a standard peft folder (``adapter_config.json`` +
  ``adapter_model.safetensors`` in float16) plus ``studio.json`` describing it.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class TrainConfig:
    name: str
    role: str  # "task" or "language"
    skill: str
    description: str
    data: str  # one line: where the examples come from
    steps: int = 200
    batch_size: int = 8
    lr: float = 3e-4
    warmup_steps: int = 10
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list = field(default_factory=lambda: list(TARGET_MODULES))
    max_length: int = 192
    seed: int = 0
    checkpoint_every: int = 25
    threads: int = 2


def encode_example(tokenizer, messages: list[dict], max_length: int) -> tuple[list[int], list[int]] | None:
    """Token ids and labels (-100 on the prompt) of one chat example; None if it cannot fit."""
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    answer = messages[-1]["content"] + tokenizer.eos_token + "\n"
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    a_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    if len(p_ids) + min(len(a_ids), 8) > max_length:
        return None
    a_ids = a_ids[: max_length - len(p_ids)]
    return p_ids + a_ids, [-100] * len(p_ids) + a_ids


def _batch_indices(n: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Indices of the batch for a step: epochs are seeded permutations of the data."""
    per_epoch = max(1, n // batch_size)
    epoch, pos = divmod(step, per_epoch)
    perm = list(range(n))
    random.Random(f"{seed}:{epoch}").shuffle(perm)
    return perm[pos * batch_size : (pos + 1) * batch_size]


def _collate(encoded, idx, pad_id):
    rows = [encoded[i] for i in idx]
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for j, (ids, lab) in enumerate(rows):
        input_ids[j, : len(ids)] = torch.tensor(ids)
        labels[j, : len(lab)] = torch.tensor(lab)
        mask[j, : len(ids)] = 1
    return input_ids, mask, labels


def answer_loss(model, input_ids, attention_mask, labels):
    """Mean next-token cross-entropy over the labelled (answer) positions.

    Same value as the model's own ``labels=`` loss, but the vocabulary projection runs only on
    the answer positions instead of the whole padded batch (a sizeable saving on CPU).
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = inner.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    target = labels[:, 1:]
    keep = target != -100
    logits = inner.lm_head(hidden[:, :-1][keep]).float()
    return torch.nn.functional.cross_entropy(logits, target[keep])


def _lr_lambda(cfg: TrainConfig):
    def f(step):
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def _atomic_torch_save(obj, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="tmp-", suffix=".pt", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _lora_state(model):
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


def save_adapter(model, cfg: TrainConfig, out_dir: Path, trained: dict, base_name: str):
    """Write the peft folder (float16 safetensors) and studio.json, atomically."""
    from safetensors.torch import load_file, save_file

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        model.save_pretrained(str(tmp))
        weights = tmp / "adapter_model.safetensors"
        tensors = {k: v.to(torch.float16).contiguous() for k, v in load_file(str(weights)).items()}
        save_file(tensors, str(weights), metadata={"format": "pt"})
        conf_path = tmp / "adapter_config.json"
        conf = json.loads(conf_path.read_text())
        conf["base_model_name_or_path"] = base_name
        conf_path.write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")
        readme = tmp / "README.md"
        if readme.exists():
            readme.unlink()
        studio = {
            "role": cfg.role,
            "skill": cfg.skill,
            "description": cfg.description,
            "base_model": base_name,
            "rank": cfg.r,
            "alpha": cfg.alpha,
            "target_modules": cfg.target_modules,
            "trained": trained,
        }
        (tmp / "studio.json").write_text(json.dumps(studio, indent=2, ensure_ascii=False) + "\n")
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; an adapter folder is an ordinary asset
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def train_lora(
    cfg: TrainConfig,
    examples: list[list[dict]],
    out_dir: str | Path,
    run_dir: str | Path = "runs",
    base=None,
    progress_bar: bool = True,
    log=print,
) -> dict:
    """Train (or resume) one LoRA and save it to ``out_dir``; returns the ``trained`` record."""
    from peft import LoraConfig, get_peft_model
    from tqdm.auto import tqdm

    from fusion.model import load_base_model

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    run_dir = Path(run_dir) / cfg.name
    ckpt_path = run_dir / "checkpoint.pt"
    if base is None:
        base = load_base_model(progress=log)
    tok = base.tokenizer
    encoded = [e for e in (encode_example(tok, m, cfg.max_length) for m in examples) if e is not None]
    if len(encoded) < cfg.batch_size:
        raise ValueError(f"{cfg.name}: only {len(encoded)} usable examples")
    n_tokens = sum(len(ids) for ids, _ in encoded)
    log(
        f"[{cfg.name}] {len(encoded)} examples ({len(examples) - len(encoded)} dropped as too long), "
        f"mean {n_tokens / len(encoded):.0f} tokens"
    )

    lcfg = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        task_type="CAUSAL_LM",
        bias="none",
    )
    model = get_peft_model(base.model, lcfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg))

    start_step, wall_before, cpu_before, losses = 0, 0.0, 0.0, []
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, weights_only=False)
        # the thread count changes speed, not results' definition: a run may resume with another
        same = {k: v for k, v in ck["config"].items() if k != "threads"} == {
            k: v for k, v in asdict(cfg).items() if k != "threads"
        }
        if not same:
            log(f"[{cfg.name}] checkpoint {ckpt_path} has a different configuration; starting over")
        else:
            named = dict(model.named_parameters())
            with torch.no_grad():
                for k, v in ck["lora"].items():
                    named[k].copy_(v)
            opt.load_state_dict(ck["optimizer"])
            sched.load_state_dict(ck["scheduler"])
            start_step, wall_before, cpu_before = ck["step"], ck["wall_seconds"], ck["cpu_seconds"]
            losses = ck["losses"]
            torch.set_rng_state(ck["torch_rng"])
            log(f"[{cfg.name}] resumed from step {start_step}")

    def checkpoint(step):
        _atomic_torch_save(
            {
                "config": asdict(cfg),
                "lora": _lora_state(model),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "step": step,
                "losses": losses,
                "wall_seconds": wall_before + time.perf_counter() - t0,
                "cpu_seconds": cpu_before + time.process_time() - c0,
                "torch_rng": torch.get_rng_state(),
            },
            ckpt_path,
        )

    t0, c0 = time.perf_counter(), time.process_time()
    bar = tqdm(
        range(start_step, cfg.steps),
        initial=start_step,
        total=cfg.steps,
        desc=cfg.name,
        disable=not progress_bar,
        mininterval=5,
    )
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    for step in bar:
        ids, mask, labels = _collate(encoded, _batch_indices(len(encoded), cfg.batch_size, cfg.seed, step), pad)
        loss = answer_loss(model, ids, mask, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 4))
        bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            checkpoint(step + 1)
    bar.close()
    wall = wall_before + time.perf_counter() - t0
    cpu = cpu_before + time.process_time() - c0
    checkpoint(cfg.steps)
    model.eval()
    trained = {
        "steps": cfg.steps,
        "seconds": round(wall, 1),
        "cpu_seconds": round(cpu, 1),
        "examples": len(encoded),
        "seed": cfg.seed,
        "data": cfg.data,
        "batch_size": cfg.batch_size,
        "lr": cfg.lr,
        "max_length": cfg.max_length,
        "loss_first10": round(sum(losses[:10]) / max(1, len(losses[:10])), 4),
        "loss_last10": round(sum(losses[-10:]) / max(1, len(losses[-10:])), 4),
        "threads": cfg.threads,
    }
    save_adapter(model, cfg, Path(out_dir), trained, base.name)
    log(
        f"[{cfg.name}] done: {cfg.steps} steps, {wall:.0f} s wall, {cpu:.0f} s CPU, "
        f"loss {trained['loss_first10']} -> {trained['loss_last10']}; saved {out_dir}"
    )
    # leave the shared base model as it was (the LoRA layers are removed again)
    model.unload()
    return trained
