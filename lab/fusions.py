"""The fusion steps of ``python -m lab build``: fitted fusions over the trained LoRAs.

After the LoRAs, for each target language l in {es, ru, zh} with the math task:

* ``{l}-math-flow``    LoRA-Flow gates over [lang-l, task-math] (paper's schedule: 5 epochs,
                       AdamW, batch 4, wd 0.1, betas 0.9/0.95, warmup 0.2, cosine; lr 1e-3 or
                       1e-4 and the epoch chosen on 60 dev problems; inference T 1.1 for ru/zh);
* ``{l}-math-cat``     CAT logits over the same pair, same data, 250 steps at lr 1e-2 (the reach
                       its logits need to leave the uniform start; see fusion/methods/cat.py);
* ``{l}-math-lorahub`` LoraHub weights (nevergrad NGOpt, budget 40, seeded, the reference's
                       objective) on the first 20 of the same problems (its paper uses 5);

fitted on 200 target-language math problems (``math_fit_data``: training templates,
train-split numbers), and one multi-task MixLoRA adapter ``mixlora-multi`` (8 experts, top-2,
r 8) trained from scratch on English math, target-language math and the language data mixed.

Every step is seeded, shows a progress bar, is skipped when its artifact already exists with the
same settings (``--force`` refits), and writes its wall and CPU seconds into the artifact's
metadata. A step is atomic: an interrupted step leaves nothing behind and is redone from its
start on the next run (a gate fit is a few hundred small steps).
"""

from __future__ import annotations

import json
import math
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from fusion.math_data import train_examples as math_examples
from fusion.safe_io import atomic_folder

from .lang_data import train_examples as lang_examples
from .math_fit_data import fit_records

FIT_LANGS = ("es", "ru", "zh")
MIXLORA_NAME = "mixlora-multi"
FIT_EXAMPLES = 200

# Settings per kind; "train" goes to Engine.fit(train=...), "options" to its **options.
SETTINGS = {
    # The paper's schedule; lr (its 1e-3 or 1e-4) and the checkpoint (epoch) are chosen on the
    # dev templates (math_data.DEV_TEMPLATES), never on the evaluation. Gates are fitted at T = 1;
    # the paper decodes zh and ru math at T = 1.1, saved with the gates.
    "lora_flow": {
        "train": {"epochs": 5, "lr": 1e-3, "batch_size": 4, "weight_decay": 0.1, "warmup_ratio": 0.2},
        "options": {},
        "grid": [{"lr": 1e-3}, {"lr": 1e-4}],
        "dev_examples": 60,
        "inference_temperature": {"es": 1.0, "ru": 1.1, "zh": 1.1},
    },
    # CAT: 250 steps at lr 1e-2 give its logits the reach to leave uniform (fusion/methods/cat.py).
    "cat": {
        "train": {"epochs": 5, "lr": 1e-2, "batch_size": 4, "weight_decay": 0.0, "warmup_ratio": 0.0},
        "options": {},
    },
    # LoraHub is a few-shot method (its paper: 5 examples); each of its 40 candidates is scored
    # by a forward pass over every example, so it gets the first 20 of the 200.
    "lorahub": {"train": {}, "options": {"budget": 40}, "few_shot": 20},
    "mixlora": {
        "train": {"epochs": 1, "lr": 3e-4, "batch_size": 4},
        "params": {"num_experts": 8, "top_k": 2, "r": 8, "lora_alpha": 16},
        "mix": {"math_en": 150, "math_per_lang": 50, "lang_per_lang": 50},
    },
}
SUFFIX = {"lora_flow": "flow", "cat": "cat", "lorahub": "lorahub"}


@dataclass
class Step:
    name: str
    method: str
    lang: str | None = None
    adapters: list = field(default_factory=list)

    @property
    def is_adapter(self) -> bool:
        return self.method == "mixlora"


def fusion_steps(langs=FIT_LANGS, methods=("lora_flow", "cat", "lorahub"), mixlora: bool = True) -> list[Step]:
    steps = []
    for lang in langs:
        for method in methods:
            steps.append(Step(f"{lang}-math-{SUFFIX[method]}", method, lang, [f"lang-{lang}", "task-math"]))
    if mixlora:
        steps.append(Step(MIXLORA_NAME, "mixlora"))
    return steps


def step_settings(
    step: Step, seed: int, epochs: int | None = None, max_steps: int | None = None, examples: int = FIT_EXAMPLES
) -> dict:
    s = json.loads(json.dumps(SETTINGS[step.method]))
    if step.method != "lorahub":
        s["train"]["seed"] = seed
        if epochs is not None:
            s["train"]["epochs"] = epochs
        if max_steps:
            s["train"]["max_steps"] = max_steps
    else:
        s["options"]["seed"] = seed
        if max_steps:
            s["options"]["budget"] = max_steps
    if step.method == "mixlora":
        s["params"]["seed"] = seed
    else:
        s["examples"] = min(examples, s.pop("few_shot", examples))
    s["seed"] = seed
    return s


def step_records(step: Step, settings: dict) -> tuple[list[dict], str]:
    """The step's training records and a one-line description of them."""
    seed = settings["seed"]
    if step.method != "mixlora":
        n = settings["examples"]
        return (
            fit_records(step.lang, n, seed),
            f"lab.math_fit_data: {n} {step.lang} math problems (training templates, train-split numbers), seed {seed}",
        )
    mix = settings["mix"]
    records = [{"messages": e.messages()} for e in math_examples(mix["math_en"], seed=seed)]
    for lang in FIT_LANGS:
        records += fit_records(lang, mix["math_per_lang"], seed)
        records += [{"messages": m} for m in lang_examples(lang, seed=seed)[: mix["lang_per_lang"]]]
    random.Random(f"mixlora:{seed}").shuffle(records)
    return records, (
        f"mixed, {len(records)} examples: {mix['math_en']} English math (math_data train), "
        f"{mix['math_per_lang']} math + {mix['lang_per_lang']} language pairs for each of "
        f"{', '.join(FIT_LANGS)} (math_fit_data, lang_data), shuffled, seed {seed}"
    )


def artifact_record(engine, step: Step) -> dict | None:
    """The build record of an existing artifact (None when absent or incomplete)."""
    folders = engine.library_folders()
    if step.is_adapter:
        path = Path(folders.adapters) / step.name / "studio.json"
        if path.is_file():
            return json.loads(path.read_text(encoding="utf-8")).get("trained")
        return None
    path = Path(folders.fusions) / step.name / "fusion.json"
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8")).get("meta", {}).get("build")
    return None


def expected_steps(step: Step, settings: dict, n_records: int) -> int:
    if step.method == "lorahub":
        return int(settings["options"]["budget"])
    train = settings["train"]
    total = math.ceil(n_records / train["batch_size"]) * train["epochs"]
    total = min(total, train["max_steps"]) if train.get("max_steps") else total
    return total * len(settings.get("grid") or [None])


def _progress_bar(name: str, enabled: bool, total: int):
    from tqdm.auto import tqdm

    state = {"bar": tqdm(total=total, desc=name, disable=not enabled, mininterval=5)}

    def on_progress(p):
        bar = state["bar"]
        if bar.total != p.total_steps:
            bar.total = p.total_steps
        bar.update(p.step - bar.n)
        bar.set_postfix(loss=f"{p.loss:.3f}")

    def close():
        state["bar"].close()

    return on_progress, close


def run_step(engine, step: Step, settings: dict, progress_bar: bool = True, log=print) -> dict:
    """Fit one step and save its artifact; returns its build record."""
    records, data = step_records(step, settings)
    on_progress, close = _progress_bar(step.name, progress_bar, expected_steps(step, settings, len(records)))
    wall0, cpu0 = time.perf_counter(), time.process_time()
    try:
        if step.is_adapter:
            with tempfile.TemporaryDirectory(prefix="mixlora-fit-") as tmp:
                out = Path(tmp) / "fit"
                artifact = engine.fit(
                    "mixlora",
                    [],
                    records,
                    params=settings["params"],
                    train=settings["train"],
                    out=str(out),
                    on_progress=on_progress,
                )
                wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
                record = _record(settings, data, artifact.meta, wall, cpu, torch.get_num_threads())
                _publish_mixlora(engine, out, step.name, record)
        else:
            tried = None
            if step.method == "lora_flow":
                artifact, tried = _fit_on_dev(engine, step, settings, records, on_progress)
            else:
                artifact = engine.fit(
                    step.method,
                    step.adapters,
                    records,
                    params={},
                    train=settings["train"],
                    on_progress=on_progress,
                    **settings["options"],
                )
            wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
            record = _record(settings, data, artifact.meta, wall, cpu, torch.get_num_threads())
            if tried is not None:
                record["dev"] = tried
            artifact.name = step.name
            artifact.meta["build"] = record
            artifact.meta["description"] = (
                f"{step.method} over {' + '.join(step.adapters)}, fitted on {len(records)} {step.lang} math problems"
            )
            saved = engine.library.save_fusion(artifact, overwrite=True)
            _readable(Path(saved.path))
    finally:
        close()
    log(
        f"[{step.name}] done: {record['steps']} steps, {record['seconds']:.0f} s wall, "
        f"{record['cpu_seconds']:.0f} s CPU, loss {record['loss_first']} -> {record['loss_last']}"
    )
    return record


def _fit_on_dev(engine, step: Step, settings: dict, records: list[dict], on_progress):
    """One LoRA-Flow fit per grid point, each keeping its best dev epoch; the fit with the lowest
    dev loss wins. Returns (artifact, [{lr, batch_size, dev_losses, best_epoch}])."""
    from fusion.training import tokenize_records

    from .math_fit_data import dev_records

    dev = tokenize_records(engine.tokenizer, dev_records(step.lang, settings["dev_examples"], settings["seed"]))
    temperature = settings["inference_temperature"].get(step.lang, 1.0)
    best, tried = None, []
    grid = settings["grid"]
    for index, point in enumerate(grid):
        train = {**settings["train"], **point}

        def progress(p, index=index):  # one bar over the whole grid
            on_progress(replace(p, step=p.step + index * p.total_steps, total_steps=p.total_steps * len(grid)))

        artifact = engine.fit(
            step.method,
            step.adapters,
            records,
            params={},
            train=train,
            on_progress=progress,
            dev=dev,
            inference_temperature=temperature,
            **settings["options"],
        )
        dev_losses = artifact.meta["dev_losses"]
        tried.append(
            {
                "lr": train["lr"],
                "batch_size": train["batch_size"],
                "dev_losses": dev_losses,
                "best_epoch": artifact.meta["best_epoch"],
            }
        )
        if dev_losses and (best is None or min(dev_losses) < min(best.meta["dev_losses"])):
            best = artifact
    return best, tried


def _record(settings, data, meta, wall, cpu, threads) -> dict:
    losses = meta.get("losses") or []
    head, tail = losses[:10], losses[-10:]
    return {
        "settings": settings,
        "data": data,
        "examples": meta.get("examples"),
        "steps": len(losses),
        "seconds": round(wall, 2),
        "cpu_seconds": round(cpu, 2),
        "threads": threads,
        "seed": settings["seed"],
        "loss_first": round(sum(head) / len(head), 4) if head else None,
        "loss_last": round(sum(tail) / len(tail), 4) if tail else None,
    }


def _readable(folder: Path) -> None:
    """safetensors writes its files private (0600); a shipped asset is an ordinary file."""
    for f in folder.iterdir():
        if f.is_file():
            f.chmod(0o644)


def _publish_mixlora(engine, fitted: Path, name: str, record: dict) -> None:
    """Ship the trained MixLoRA folder as float16 safetensors (half the size of the fp32 pickle
    the reference package writes; our loader reads both) plus studio.json, atomically."""
    state = torch.load(fitted / "adapter_model.bin", weights_only=True)
    with atomic_folder(Path(engine.library_folders().adapters) / name, overwrite=True) as tmp:
        shutil.copy2(fitted / "adapter_config.json", tmp / "adapter_config.json")
        save_file(
            {k: v.to(torch.float16).contiguous() for k, v in state.items()},
            str(tmp / "adapter_model.safetensors"),
            metadata={"format": "pt"},
        )
        studio = {
            "role": "other",
            "skill": "math+languages",
            "description": "MixLoRA (8 experts, top-2, r 8) trained multi-task: English math, "
            "es/ru/zh math and es/ru/zh language pairs mixed.",
            "base_model": engine.base_info().name,
            "trained": record,
        }
        (tmp / "studio.json").write_text(json.dumps(studio, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        _readable(tmp)
    engine.rescan()


def build_fusions(
    engine,
    langs=FIT_LANGS,
    methods=("lora_flow", "cat", "lorahub"),
    mixlora: bool = True,
    seed: int = 0,
    epochs: int | None = None,
    max_steps: int | None = None,
    examples: int = FIT_EXAMPLES,
    force: bool = False,
    only: list | None = None,
    progress_bar: bool = True,
    log=print,
) -> dict:
    """Run every fusion step that is not done yet; returns {name: record or reason skipped}."""
    summary = {}
    available = {a["name"] for a in engine.adapters()}
    for step in fusion_steps(langs, methods, mixlora):
        if only and step.name not in only:
            continue
        settings = step_settings(step, seed, epochs, max_steps, examples)
        existing = artifact_record(engine, step)
        if existing is not None and not force:
            if existing.get("settings") == settings:
                log(f"[{step.name}] already built; --force to refit")
                summary[step.name] = existing
                continue
            log(f"[{step.name}] exists with other settings; refitting")
        missing = [a for a in step.adapters if a not in available]
        if missing:
            log(f"[{step.name}] skipped: adapter(s) {', '.join(missing)} not built yet")
            summary[step.name] = f"skipped: {', '.join(missing)} missing"
            continue
        summary[step.name] = run_step(engine, step, settings, progress_bar, log)
    return summary
