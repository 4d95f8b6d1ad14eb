"""`python -m fusion bench`: decode speed of every method as a ratio to the base model.

One process, one base model; every method is measured next to a base run and its ratio taken
against that run, so machine drift cancels (min and max of those ratios are reported). Each
measurement is a greedy decode of N tokens after a short chat prompt through the engine's
scheduler, the path every reply takes (one row per prompt of the batch, KV cache, detokenisation,
no early stop, no trace recording). A static method is merged into the weights as the scheduler
does for a lone static fusion, or kept as low-rank factors in the "(unmerged)" cases. Random
rank-8 LoRAs on all seven projections (and a random 8-expert top-2 MixLoRA) of the base
model's shape are written to a temporary folder, so results do not depend on the library's
contents. The
reference implementations (peft unmerged, peft X-LoRA, the `mixlora` package) run a plain
batch decoding loop on separate copies of the base model in the same run.
"""

from __future__ import annotations

import json
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, DynamicCache

from .engine import Engine, FusionRequest
from .generate import Sampling
from .random_adapters import write_random_lora, write_random_mixlora
from .safe_io import first_line

PROMPT = "Write a short story about a dragon who learns to count."


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class NoStopTokenizer:
    """The tokenizer with no stop tokens, so every stream decodes its whole budget."""

    eos_token_id = None

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.unk_token_id = tokenizer.unk_token_id

    def convert_tokens_to_ids(self, token):
        return None

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


@torch.inference_mode()
def decode_speed(model, input_ids: torch.Tensor, tokens: int) -> dict:
    """A reference model's greedy decode of `tokens` tokens after a prefill, in a plain loop;
    returns tokens/s and first-token time."""
    device = input_ids.device
    cache = DynamicCache(config=model.config)
    _sync(device)
    start = time.perf_counter()
    logits = model(input_ids=input_ids, past_key_values=cache, use_cache=True).logits[:, -1]
    token = logits.argmax(-1, keepdim=True)  # (B, 1)
    _sync(device)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(tokens):
        logits = model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1]
        token = logits.argmax(-1, keepdim=True)
    _sync(device)
    decode = time.perf_counter() - start
    return {"tokens_per_s": tokens * input_ids.shape[0] / decode, "first_token_s": first}


def scheduler_speed(engine: Engine, request: FusionRequest, input_ids: torch.Tensor, tokens: int) -> dict:
    """The same through the engine's scheduler, every row of `input_ids` a request of its own,
    all submitted at once: tokens/s over the decode (after the last row's first token) and the
    first-token time (submission to the last row's first token, its prefill included)."""
    prompts = input_ids.tolist()
    start = time.perf_counter()
    finals = list(engine.generate_ids_many(request, prompts, Sampling(max_new_tokens=tokens + 1), trace=False))
    _sync(input_ids.device)
    wall = time.perf_counter() - start
    first = max(e.seconds_to_first_token for e in finals)
    decoded = sum(len(e.token_ids) - 1 for e in finals)
    return {"tokens_per_s": decoded / (wall - first) if decoded else 0.0, "first_token_s": first}


class Case:
    def __init__(
        self,
        name: str,
        engine: Engine | None = None,
        request: FusionRequest | None = None,
        merge: bool = False,
        model=None,
        group: str = "ours",
    ):
        self.name, self.engine, self.request, self.merge, self.model, self.group = (
            name,
            engine,
            request,
            merge,
            model,
            group,
        )
        self.speeds: list[float] = []
        self.first: list[float] = []
        self.extra: dict = {}

    def measure(self, ids: torch.Tensor, tokens: int) -> dict:
        if self.model is not None:  # a reference implementation on its own model copy
            return decode_speed(self.model, ids, tokens)
        self.engine.scheduler.merge_static = self.merge
        return scheduler_speed(self.engine, self.request, ids, tokens)


def _reference_models(
    engine: Engine, base_folder: str, loras: list[Path], mixlora_folder: Path, wanted: set, log
) -> list[Case]:
    cases = []

    def fresh():
        return AutoModelForCausalLM.from_pretrained(base_folder, dtype=engine.base.dtype).to(engine.base.device).eval()

    if "peft" in wanted:
        one = PeftModel.from_pretrained(fresh(), str(loras[1]), adapter_name="t").eval()
        cases.append(Case("peft single (unmerged)", model=one, group="reference"))
        two = PeftModel.from_pretrained(fresh(), str(loras[0]), adapter_name="l")
        two.load_adapter(str(loras[1]), adapter_name="t")
        two.base_model.set_adapter(["l", "t"])
        cases.append(Case("peft 2 LoRAs (unmerged)", model=two.eval(), group="reference"))
    if "xlora" in wanted:
        try:
            from peft import XLoraConfig, get_peft_model

            config = XLoraConfig(
                task_type="CAUSAL_LM",
                hidden_size=engine.model.config.hidden_size,
                xlora_depth=1,
                adapters={"0": str(loras[0]), "1": str(loras[1])},
            )
            base = fresh()
            base.config.use_cache = False
            xlora = get_peft_model(base, config).eval()
            cases.append(Case("peft X-LoRA k=2", model=xlora, group="reference"))
        except Exception as exc:  # report, don't abort the whole benchmark
            log(f"X-LoRA reference unavailable: {type(exc).__name__}: {first_line(exc, 160)}")
    if "mixlora" in wanted:
        try:
            from mixlora import MixLoraModelForCausalLM  # the reference package, optional

            model, _ = MixLoraModelForCausalLM.from_pretrained(str(mixlora_folder))
            model = model.to(engine.base.device).eval()
            for layer in model.model.layers:  # its expert LoRAs sit outside the module tree
                for moe in getattr(layer.mlp, "mixlora_moes", {}).values():
                    for lora in moe.experts_.values():
                        lora.eval()
            cases.append(Case("mixlora package 8x top-2", model=model, group="reference"))
        except Exception as exc:
            log(f"mixlora reference unavailable: {type(exc).__name__}: {first_line(exc, 160)}")
    return cases


def run_bench(
    model: str = "default",
    device: str = "cpu",
    dtype: str = "float32",
    methods: list[str] | None = None,
    tokens: int = 64,
    repeats: int = 3,
    prefill: int = 512,
    references: str = "all",
    batch: int = 1,
    log=print,
) -> dict:
    scratch = Path(tempfile.mkdtemp(prefix="fusion-bench-"))
    engine = Engine(
        model=model,
        device=device,
        dtype=dtype,
        adapters_dir=scratch / "adapters",
        fusions_dir=scratch / "fusions",
        progress=log,
    )
    base_folder = engine.base.info["source"]
    loras = [
        write_random_lora(scratch / "adapters" / n, engine.model, seed=i)
        for i, n in enumerate(("lang", "task", "task2", "task3"))
    ]
    mix_folder = write_random_mixlora(scratch / "adapters" / "mix", engine.model, base_folder)
    engine.library.rescan()
    pair, four = ["lang", "task"], ["lang", "task", "task2", "task3"]
    catalogue = [
        ("base", FusionRequest(), False),
        ("single (merged)", FusionRequest(["task"], "single"), True),
        ("linear k=2 (merged)", FusionRequest(pair, "linear"), True),
        ("linear k=2 (unmerged)", FusionRequest(pair, "linear"), False),
        ("ties k=2 (merged)", FusionRequest(pair, "ties"), True),
        ("lorahub k=2 (merged)", FusionRequest(pair, "lorahub", {"weights": [0.5, 0.5]}), True),
        ("cat k=2 (merged)", FusionRequest(pair, "cat"), True),
        ("lora_flow k=2", FusionRequest(pair, "lora_flow"), False),
        ("lora_flow k=4", FusionRequest(four, "lora_flow"), False),
        ("mixlora 8x top-2", FusionRequest(["mix"], "mixlora"), False),
    ]
    if methods:
        catalogue = [c for c in catalogue if c[0] == "base" or c[1].method in methods or c[0] in methods]
    cases = [Case(name, engine, req, merge) for name, req, merge in catalogue]
    wanted = (
        {"peft", "xlora", "mixlora"}
        if references == "all"
        else set()
        if references == "none"
        else set(references.split(","))
    )
    if wanted and engine.base.info["source"]:
        cases += _reference_models(engine, base_folder, loras, mix_folder, wanted, log)

    chat = engine.encode_messages(PROMPT)
    engine.tokenizer = NoStopTokenizer(engine.tokenizer)  # every measurement decodes all its tokens
    engine.model.generation_config.eos_token_id = None
    ids = torch.tensor([chat] * batch, device=engine.base.device)
    long_ids = torch.randint(100, 1000, (1, prefill), generator=torch.Generator().manual_seed(0)).to(engine.base.device)

    def switch_time(case: Case) -> float:
        """A method change with the adapters already loaded: build the plan, merge and restore."""
        engine.clear_plan_cache()
        start = time.perf_counter()
        plan = engine.plan(case.request)
        if case.merge:
            with engine.using(plan, merge=True):
                pass
        return time.perf_counter() - start

    for case in cases:  # warm-up at full length (not counted); loads every adapter once
        if case.engine is not None:
            switch_time(case)
        case.measure(ids, tokens)
    base, others = cases[0], cases[1:]
    for r in range(repeats):
        log(f"round {r + 1}/{repeats}")
        # Every method is measured right next to a base run (before it in even rounds, after it in
        # odd ones) and its ratio is taken against that run: drift of the machine cancels out.
        for case in others if r % 2 == 0 else others[::-1]:
            pair = (base, case) if r % 2 == 0 else (case, base)
            got = {id(c): c.measure(ids, tokens) for c in pair}
            b, c = got[id(base)], got[id(case)]
            base.speeds.append(b["tokens_per_s"])
            base.first.append(b["first_token_s"])
            case.speeds.append(c["tokens_per_s"])
            case.first.append(c["first_token_s"])
            case.extra.setdefault("ratios", []).append(c["tokens_per_s"] / b["tokens_per_s"])
            got = {id(x): x.measure(long_ids, 0)["first_token_s"] for x in pair}  # long-prompt prefill
            base.extra.setdefault("prefill", []).append(got[id(base)])
            case.extra.setdefault("prefill", []).append(got[id(case)])
            case.extra.setdefault("prefill_ratios", []).append(got[id(case)] / got[id(base)])
            if case.engine is not None:
                case.extra.setdefault("switches", []).append(switch_time(case))
    rows = []
    for case in cases:
        ratios = case.extra.get("ratios", [1.0])
        prefill_ratios = case.extra.get("prefill_ratios", [1.0])
        switches = case.extra.get("switches")
        rows.append(
            {
                "name": case.name,
                "group": case.group,
                "tokens_per_s": round(statistics.median(case.speeds), 2),
                "ratio_to_base": round(statistics.median(ratios), 3),
                "ratio_spread": [round(min(ratios), 3), round(max(ratios), 3)],
                "first_token_s": round(statistics.median(case.first), 4),
                "prefill_s": round(statistics.median(case.extra["prefill"]), 4),
                "prefill_overhead": round(statistics.median(prefill_ratios) - 1, 3),
                "switch_s": round(statistics.median(switches), 4) if switches else None,
                "runs": [round(s, 2) for s in case.speeds],
            }
        )
    by_name = {row["name"]: row for row in rows}
    speedups = {}
    for ours, ref in (
        ("lora_flow k=2", "peft 2 LoRAs (unmerged)"),
        ("lora_flow k=2", "peft X-LoRA k=2"),
        ("linear k=2 (merged)", "peft 2 LoRAs (unmerged)"),
        ("single (merged)", "peft single (unmerged)"),
        ("mixlora 8x top-2", "mixlora package 8x top-2"),
    ):
        if ours in by_name and ref in by_name:
            speedups[f"{ours} vs {ref}"] = round(by_name[ours]["tokens_per_s"] / by_name[ref]["tokens_per_s"], 2)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    machine = {
        "device": str(engine.base.device),
        "dtype": str(engine.base.dtype),
        "model": engine.base.name,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "batch": batch,
        "tokens": tokens,
        "repeats": repeats,
        "prefill_tokens": prefill,
    }
    if engine.base.device.type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(engine.base.device)
        machine["peak_gpu_memory_mb"] = round(torch.cuda.max_memory_allocated(engine.base.device) / 2**20, 1)
    return {"machine": machine, "rows": rows, "speedups": speedups, "peak_rss_mb": round(peak, 1)}


def format_table(result: dict) -> str:
    lines = [
        f"{'method':<28} {'tok/s':>8} {'x base':>7} {'(min-max)':>13} {'TTFT s':>8} {'prefill s':>10} "
        f"{'+prefill':>9} {'switch s':>9}"
    ]
    for row in result["rows"]:
        switch = "" if row["switch_s"] is None else f"{row['switch_s']:.3f}"
        lo, hi = row.get("ratio_spread", [row["ratio_to_base"]] * 2)
        lines.append(
            f"{row['name']:<28} {row['tokens_per_s']:>8.2f} {row['ratio_to_base']:>7.3f} "
            f"{f'({lo:.2f}-{hi:.2f})':>13} "
            f"{row['first_token_s']:>8.3f} {row['prefill_s']:>10.3f} {row['prefill_overhead']:>+9.1%} "
            f"{switch:>9}"
        )
    for name, value in result["speedups"].items():
        lines.append(f"speed-up {name}: {value:.2f}x")
    m = result["machine"]
    lines.append(
        f"[{m['model']} on {m['device']} {m['dtype']}, batch {m['batch']}, {m['tokens']} tokens x "
        f"{m['repeats']} interleaved rounds, torch {m['torch']}, {m['threads']} threads; "
        f"peak RSS {result['peak_rss_mb']:.0f} MB]"
    )
    return "\n".join(lines)


def main(args) -> int:
    def log(*a, **k):
        print(*a, file=sys.stderr)

    methods = [m.strip() for m in args.methods.split(",")] if args.methods else None
    result = run_bench(
        args.model or "default",
        args.device,
        args.dtype,
        methods,
        args.tokens,
        args.repeats,
        args.prefill,
        args.references,
        getattr(args, "batch", 1),
        log,
    )
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0
