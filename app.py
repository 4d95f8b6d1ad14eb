"""LoRA composition studio: the web app over the `fusion` engine.

    python app.py [--model ID] [--device D] [--dtype T] [--adapters DIR] [--fusions DIR]
                  [--host H] [--port P] [--auth USER:PASS] [--share] [--backend URL]

Tabs: Chat (fuse LoRAs per message, see why it answered so), Compare (fusions side by side),
Fit (learn a fusion from examples), Adapters (the library, imports). Named API endpoints for
gradio_client: /methods, /adapters, /generate, /compare, /fit (see docs/app.md).
With --backend URL the app loads no model and sends every request to engine replicas served by
`python -m fusion serve` (see docs/scale.md).
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402

from fusion.api import Backend  # noqa: E402
from fusion.engine import Engine  # noqa: E402
from fusion.errors import FusionError  # noqa: E402
from fusion.model import resolve_device  # noqa: E402
from fusion.remote import RemoteEngine  # noqa: E402
from ui.adapters import build_adapters_tab, errors_text, fusion_rows, library_rows, removable_choices  # noqa: E402
from ui.api import register_api  # noqa: E402
from ui.chat import build_chat_tab  # noqa: E402
from ui.common import CSS, Studio, theme  # noqa: E402
from ui.compare import build_compare_tab  # noqa: E402
from ui.constants import APP  # noqa: E402
from ui.fit import build_fit_tab  # noqa: E402

TITLE = "LoRA composition studio"


def build_app(engine: Backend) -> gr.Blocks:
    """The whole app around one engine, in this process or remote; the queue is configured, not launched."""
    studio = Studio(engine)
    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
        gr.Markdown(
            f"## {TITLE}\nCompose LoRA adapters per request — static merges, fitted fusions and "
            "LoRA-Flow's per-token gates — and see which LoRA each layer leaned on."
        )
        register_api(engine)  # first, so the public endpoint names are never taken by UI events
        with gr.Tabs():
            build_chat_tab(studio)
            build_compare_tab(studio)
            fit = build_fit_tab(studio)
            library = build_adapters_tab(studio)

        # After a fit, an import or a deletion, every picker and the library tables show the change;
        # pickers that follow a method (Compare's adapters) keep offering the kind it takes.
        by_method = studio.pickers.by_method
        outputs = (
            studio.pickers.components()
            + [a for a, _ in by_method]
            + [library["table"], library["fusions"], library["errors"], library["delete"]]
        )

        def refresh_all(*methods):
            return (
                *studio.pickers.updates(engine),
                *studio.pickers.kind_updates(engine, list(methods)),
                library_rows(engine),
                fusion_rows(engine),
                errors_text(engine),
                gr.update(choices=removable_choices(engine)),
            )

        methods = [m for _, m in by_method]
        for event in [fit["event"], *library["events"]]:
            event.then(refresh_all, methods, outputs, api_visibility="private", queue=False)
        # A page opened later must see fusions and adapters added since start-up.
        demo.load(refresh_all, methods, outputs, api_visibility="private", queue=False)
    demo.queue(default_concurrency_limit=APP.concurrency, max_size=APP.queue_size)
    return demo


def security_warnings(host: str, share: bool, auth: str | None) -> list[str]:
    """Exposing the app lets anyone generate, fit (CPU/GPU time) and write adapters to disk."""
    warnings = []
    if auth:
        return warnings
    if host in ("0.0.0.0", "::"):
        warnings.append(
            f"binding {host} makes the studio reachable from other machines without a password; add --auth USER:PASS"
        )
    if share:
        warnings.append("--share publishes the studio on a public link without a password; add --auth USER:PASS")
    return warnings


def parse_auth(value: str | None):
    if not value:
        return None
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise SystemExit("--auth must look like USER:PASS")
    return (user, password)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=TITLE)
    parser.add_argument(
        "--model",
        default="default",
        help="base model: 'default' (embedded SmolLM2-135M-Instruct), a folder or a hub id",
    )
    parser.add_argument(
        "--device", default="auto", help="auto (a CUDA GPU when there is one, else cpu), cpu, cuda or cuda:1"
    )
    parser.add_argument(
        "--dtype", default="auto", help="auto (bfloat16 on a GPU, float32 on cpu), float32, bfloat16 or float16"
    )
    parser.add_argument("--adapters", default=None, help="adapter library folder (default: assets/adapters)")
    parser.add_argument("--fusions", default=None, help="saved fusions folder (default: assets/fusions)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: local only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--auth", default=None, help="USER:PASS required to open the app")
    parser.add_argument("--share", action="store_true", help="also publish on a temporary public link")
    parser.add_argument(
        "--backend",
        default=None,
        help="URL of engine replicas (python -m fusion serve); the app then loads no model itself",
    )
    return parser.parse_args(argv)


def resolved_dtype(device: str, dtype: str) -> str:
    """bfloat16 halves a GPU's memory and time at no cost in quality here; CPUs are fastest in float32."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if resolve_device(device).type == "cuda" else "float32"


def open_engine(args: argparse.Namespace) -> Backend:
    """The in-process engine, or a client of remote replicas when --backend is given."""
    if args.backend:
        return RemoteEngine(args.backend)
    return Engine(
        model=args.model,
        device=args.device,
        dtype=resolved_dtype(args.device, args.dtype),
        adapters_dir=args.adapters,
        fusions_dir=args.fusions,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    auth = parse_auth(args.auth)
    for line in security_warnings(args.host, args.share, args.auth):
        print(f"WARNING: {line}", file=sys.stderr)
    try:
        engine = open_engine(args)
    except FusionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for name, message in engine.library_errors().items():
        print(f"note: adapter {name} was not loaded: {message}", file=sys.stderr)
    demo = build_app(engine)
    demo.launch(
        server_name=args.host,
        server_port=args.port,
        auth=auth,
        share=args.share,
        theme=theme(),
        css=CSS,
        show_error=False,
        max_file_size=f"{APP.max_upload_mb}mb",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
