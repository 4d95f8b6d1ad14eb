"""Command line: `python -m fusion {methods,adapters,generate,fit,export,bench,serve,serve-bench} ...`."""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading

from .errors import FusionError

# Each command imports the engine (transformers and peft take seconds to import) or Ray when it
# runs, so that `--help` and argument errors answer quickly.

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def _model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=None,
        help="'default' (embedded SmolLM2-135M-Instruct), a local folder, or a hub id "
        "(default: the preset's model, else 'default')",
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    parser.add_argument("--adapters-dir", default=None, help="adapter library folder (default assets/adapters)")
    parser.add_argument("--fusions-dir", default=None, help="fitted fusions folder (default assets/fusions)")


def _request_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapters", default="", help="comma-separated adapter names or folders, language first")
    parser.add_argument("--adapter", default=None, help="one adapter folder (e.g. a MixLoRA checkpoint)")
    parser.add_argument("--method", default=None, help="fusion method (see `methods`)")
    parser.add_argument("--fusion", default=None, help="a saved fitted fusion (sets method, adapters, params)")
    parser.add_argument(
        "--gates", default=None, help="LoRA-Flow gates: fusion name, folder, released .pt or hf:repo/path"
    )
    parser.add_argument(
        "--preset",
        default=None,
        help="a paper's released setup, e.g. lora-flow:es-math or mixlora:alpaca-7b (GPU host, network)",
    )
    parser.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="method parameter, repeatable (e.g. --param weights=0.3,0.7)",
    )


def _params(items: list[str]) -> dict:
    params = {}
    for item in items:
        if "=" not in item:
            raise FusionError(f"--param {item!r} must look like key=value")
        key, value = item.split("=", 1)
        params[key.strip()] = value.strip()
    return params


def _engine(args, quiet: bool):
    from .engine import Engine

    progress = (lambda *a, **k: print(*a, file=sys.stderr)) if not quiet else (lambda *a, **k: None)
    model = args.model
    if model is None and getattr(args, "preset", None):
        from .presets import get_preset

        model = get_preset(args.preset).model
    return Engine(
        model=model or "default",
        device=args.device,
        dtype=args.dtype,
        adapters_dir=args.adapters_dir,
        fusions_dir=args.fusions_dir,
        progress=progress,
    )


def _request(args):
    from .engine import FusionRequest

    if getattr(args, "preset", None):
        from .presets import get_preset

        request = get_preset(args.preset).request
        request.params.update(_params(args.param))
        return request
    adapters = [a.strip() for a in args.adapters.split(",") if a.strip()]
    if args.adapter:
        adapters.append(args.adapter)
    params = _params(args.param)
    if args.gates:
        params["gates"] = args.gates
    method = args.method or (
        "base" if not adapters and not args.fusion else "single" if len(adapters) == 1 else "linear"
    )
    return FusionRequest(adapters=adapters, method=method, params=params, fusion=args.fusion)


def cmd_methods(args) -> int:
    from .methods import METHODS

    described = [m.describe() for m in METHODS.values()]
    if args.json:
        print(json.dumps(described, indent=2))
        return 0
    for m in described:
        params = ", ".join(f"{p['name']}={p['default']}" for p in m["params"]) or "-"
        print(f"{m['name']:<20} {m['kind']:<8} {m['pretty_name']:<34} params: {params}")
    return 0


def cmd_adapters(args) -> int:
    engine = _engine(args, quiet=args.json)
    rows = engine.adapters()
    if args.json:
        print(json.dumps({"adapters": rows, "fusions": engine.fusions(), "errors": engine.library_errors()}, indent=2))
        return 0
    for a in rows:
        print(f"{a['name']:<16} {a['kind']:<8} {a['role']:<9} r={a['rank']:<4} {','.join(a['targets'])}")
    for f in engine.fusions():
        print(f"{f['name']:<16} fusion   {f['method']:<9} over {', '.join(f['adapters'])}")
    for name, error in engine.library_errors().items():
        print(f"{name}: not loaded: {error}")
    return 0


def cmd_generate(args) -> int:
    from .generate import Sampling

    engine = _engine(args, quiet=args.json)
    request = _request(args)
    sampling = Sampling(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed
    )
    final = None
    for event in engine.stream(request, args.prompt, sampling, system=args.system):
        if not args.json and event.delta:
            print(event.delta, end="", flush=True)
        final = event
    trace = final.trace
    if args.trace_out and trace is not None:
        trace.save(args.trace_out)
    if args.json:
        method, adapters, params = engine.resolve(request)
        print(
            json.dumps(
                {
                    "text": final.text,
                    "method": method.name,
                    "adapters": [a.name for a in adapters],
                    "params": params,
                    "finish_reason": final.finish_reason,
                    "prompt_tokens": final.prompt_tokens,
                    "new_tokens": len(final.token_ids),
                    "seconds_to_first_token": final.seconds_to_first_token,
                    "tokens_per_second": final.tokens_per_second,
                    "trace": None
                    if trace is None
                    else {
                        "shape": list(trace.shape),
                        "slot_names": trace.slot_names,
                        "kind": trace.kind,
                        "tokens": trace.tokens,
                        "weights": trace.weights.tolist() if args.full_trace else None,
                    },
                },
                ensure_ascii=False,
            )
        )
    else:
        print()
        if trace is not None:
            print(
                f"[{final.finish_reason}; {len(final.token_ids)} tokens; trace {trace.kind} "
                f"shape {tuple(trace.shape)} slots {trace.slot_names}]",
                file=sys.stderr,
            )
    return 0


def cmd_fit(args) -> int:
    from .training import load_records

    if not args.out and not args.save_as:
        raise FusionError("fit needs --out FOLDER or --save-as NAME to keep what it learns")
    engine = _engine(args, quiet=False)
    request = _request(args)
    records = load_records(args.data)
    train = {
        k: v
        for k, v in {
            "epochs": args.epochs,
            "lr": args.lr,
            "batch_size": args.batch_size,
            "max_steps": args.max_steps,
            "seed": args.seed,
        }.items()
        if v is not None
    }
    from tqdm import tqdm

    bar = tqdm(total=None, desc=f"fit {request.method}", unit="step")

    def progress(p):
        bar.total = p.total_steps
        bar.n = p.step
        bar.set_postfix(loss=f"{p.loss:.4f}")
        bar.refresh()

    cancel = threading.Event()
    try:
        artifact = engine.fit(
            request.method,
            request.adapters,
            records,
            request.params,
            train=train,
            save_as=args.save_as,
            out=args.out,
            overwrite=args.overwrite,
            on_progress=progress,
            cancel=cancel,
        )
    except KeyboardInterrupt:
        cancel.set()
        raise
    finally:
        bar.close()
    losses = artifact.meta.get("losses", [])
    print(
        json.dumps(
            {
                "name": artifact.name,
                "method": artifact.method,
                "adapters": artifact.adapters,
                "path": artifact.path,
                "params": artifact.params,
                "steps": len(losses),
                "first_loss": losses[0] if losses else None,
                "last_loss": losses[-1] if losses else None,
                "seconds": artifact.meta.get("seconds"),
            }
        )
    )
    return 0


def cmd_export(args) -> int:
    from .export import export_merged, export_peft

    engine = _engine(args, quiet=False)
    request = _request(args)
    write = export_merged if args.merged else export_peft
    out = write(engine, request, args.out, overwrite=args.overwrite)
    print(
        json.dumps(
            {
                "out": str(out),
                "kind": "merged model" if args.merged else "peft LoRA",
                "method": request.method,
                "adapters": request.adapters,
            }
        )
    )
    return 0


def cmd_bench(args) -> int:
    if args.concurrency:
        from .batch_bench import main as batch_bench_main

        return batch_bench_main(args)
    from .bench import main as bench_main

    return bench_main(args)


def cmd_serve(args) -> int:
    from .serve import main as serve_main

    return serve_main(args)


def cmd_serve_bench(args) -> int:
    from .serve_bench import main as serve_bench_main

    return serve_bench_main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fusion", description="LoRA composition studio engine")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("methods", help="list fusion methods and their parameters")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("adapters", help="list the adapter library")
    _model_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_adapters)

    p = sub.add_parser("generate", help="fuse adapters and answer a prompt")
    _model_args(p)
    _request_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--system", default=None)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.add_argument("--full-trace", action="store_true", help="include the trace weights in --json output")
    p.add_argument("--trace-out", default=None, help="save the trace (.json or .csv)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("fit", help="fit LoRA-Flow gates, CAT logits, LoraHub weights or a MixLoRA adapter")
    _model_args(p)
    _request_args(p)
    p.add_argument("--data", required=True, help='JSONL of {"prompt", "response"} or {"messages": [...]}')
    p.add_argument("--out", default=None, help="folder to write the result to")
    p.add_argument("--save-as", default=None, help="name to save under in the library")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("export", help="write a static fusion as a peft LoRA folder or a merged model")
    _model_args(p)
    _request_args(p)
    p.add_argument("--out", required=True, help="folder to create")
    p.add_argument("--merged", action="store_true", help="write the full model with the fusion merged in")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("bench", help="decode speed of every method relative to the base model")
    _model_args(p)
    p.add_argument("--methods", default=None, help="comma-separated subset")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--references", default="all", help="'all', 'none' or a subset of peft,xlora,mixlora")
    p.add_argument(
        "--concurrency",
        default=None,
        help="e.g. 1,8,16: concurrent streams, each its own fusion, scheduler vs thread per request",
    )
    p.add_argument("--stream-tokens", default="64,128", help="with --concurrency: new tokens per stream, min,max")
    p.add_argument("--rank", type=int, default=8, help="with --concurrency: rank of the random LoRAs")
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="with --concurrency: rounds of the three paths; ratios are medians of per-round ratios",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("serve", help="engine replicas behind Ray Serve (needs requirements-scale.txt)")
    _model_args(p)
    p.add_argument("--replicas", type=int, default=2, help="number of engine replicas (one per GPU, or CPU ones)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--threads", type=int, default=None, help="torch threads per replica (CPU)")
    p.add_argument("--cpus-per-replica", type=float, default=1.0)
    p.add_argument("--gpus-per-replica", type=float, default=0.0, help="1 puts each replica on its own GPU")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs Ray may use (default: all)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("serve-bench", help="requests/s and tokens/s of a running backend under concurrent load")
    p.add_argument("--backend", required=True, help="URL printed by `serve`, e.g. http://127.0.0.1:8000")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--tokens", type=int, default=64, help="new tokens per request (greedy, no early stop)")
    p.add_argument("--adapters", default="lang-es,task-math")
    p.add_argument("--method", default="lora_flow")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_serve_bench)

    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FusionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
