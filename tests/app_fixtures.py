"""Fixtures for the web app tests: the real embedded base model with random LoRAs of its shape in a
temporary library, and the app launched on a free local port.

The engine is built once per test session (it is cached here, whichever module asks first);
each test module launches and closes its own app around it.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from helpers import lora_state, write_lora  # noqa: E402

# name, seed, role: two language and two task LoRAs (rank 4, small weights so replies stay readable)
LIBRARY = (("lang-es", 1, "language"), ("lang-ru", 3, "language"), ("task-math", 2, "task"), ("task-code", 4, "task"))
MIXLORA = "moe-mix"  # added when the engine has the mixlora method
LAYERS = 30  # SmolLM2-135M


@functools.lru_cache(maxsize=1)
def shared_engine():
    from fusion.engine import Engine
    from fusion.errors import FusionError

    root = Path(tempfile.mkdtemp(prefix="studio-app-tests-"))
    atexit.register(shutil.rmtree, root, True)
    try:
        engine = Engine(
            model="default",
            device="cpu",
            dtype="float32",
            adapters_dir=root / "adapters",
            fusions_dir=root / "fusions",
            progress=lambda *args: None,
        )
    except FusionError as exc:  # the embedded model package is not installed here
        pytest.skip(f"the default base model is unavailable: {exc}")
    for name, seed, role in LIBRARY:
        write_lora(
            root / "adapters" / name,
            engine.model,
            rank=4,
            alpha=8.0,
            seed=seed,
            role=role,
            state=lora_state(engine.model, rank=4, seed=seed, std=0.02),
        )
    write_mixlora_adapter(root / "adapters" / MIXLORA, engine.model)
    engine.library.rescan()
    return engine


def write_mixlora_adapter(folder: Path, model) -> None:
    """A random MixLoRA adapter (4 experts, top-2) when the engine knows the method."""
    from fusion.methods import METHODS

    if "mixlora" not in METHODS:
        return
    from mixlora_helpers import mixlora_config, mixlora_state, write_mixlora

    write_mixlora(
        folder,
        mixlora_config("default", num_experts=4, top_k=2, rank=4, alpha=8),
        mixlora_state(model, num_experts=4, rank=4, seed=5, std=0.02),
        fmt="safetensors",
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_app(engine):
    """Gradio's own test pattern: launch without blocking, yield the URL, close in finally."""
    from app import build_app
    from ui.common import CSS, theme

    demo = build_app(engine)
    port = free_port()
    try:
        demo.launch(
            server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, theme=theme(), css=CSS
        )
        yield demo, f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


@pytest.fixture(scope="module")
def app_engine():
    return shared_engine()


@pytest.fixture(scope="module")
def app_url(app_engine):
    with running_app(app_engine) as (_, url):
        yield url
