"""Bad prompts and files get one clear sentence; saves are atomic even when killed midway."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from helpers import tiny_model, write_lora

from fusion.artifacts import FusionArtifact, load_artifact, save_artifact
from fusion.engine import Engine, FusionRequest, clean_text
from fusion.errors import FusionError
from fusion.limits import LIMITS
from fusion.model import BaseModel

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture()
def engine(tmp_path):
    model = tiny_model(seed=2, layers=2)
    write_lora(tmp_path / "adapters" / "lang-a", model, seed=1)
    write_lora(tmp_path / "adapters" / "task-b", model, seed=2)
    return Engine(
        base=BaseModel(model, None, "tiny", torch.device("cpu"), torch.float32),
        adapters_dir=tmp_path / "adapters",
        fusions_dir=tmp_path / "fusions",
    )


@pytest.mark.parametrize(
    "text,message",
    [
        ("", "the message is empty"),
        ("   \n\t ", "the message is empty"),
        ("\x00\x01\x07", "the message is empty"),
        ("x" * (1024 * 1024), f"limit is {LIMITS.max_prompt_chars}"),
    ],
)
def test_bad_prompts_are_one_sentence(text, message):
    with pytest.raises(FusionError, match=message) as caught:
        clean_text(text)
    assert "\n" not in str(caught.value)


def test_control_characters_are_dropped_but_newlines_kept():
    assert clean_text("a\x00b\x1bc\nd\te\u200b") == "abc\nd\te"


@pytest.mark.parametrize(
    "request_, message",
    [
        (FusionRequest(["lang-a", "task-b"], "nope"), "unknown fusion method 'nope'"),
        (FusionRequest(["lang-a", "missing"], "linear"), "adapter 'missing' is neither in the library"),
        (FusionRequest(["lang-a", "lang-a"], "linear"), "the same adapter was chosen twice"),
        (FusionRequest(["lang-a"], "lora_flow"), "takes at least 2 adapter"),
        (FusionRequest(["lang-a", "task-b"], "linear", {"weights": "1,2,3"}), "got 3 weights for 2 adapters"),
        (FusionRequest(["lang-a", "task-b"], "ties", {"density": 7}), "'density'.*must lie in"),
        (FusionRequest(["lang-a", "task-b"], "lora_flow", {"gates": "no-such-gates"}), "fitted fusion 'no-such-gates'"),
        (FusionRequest(fusion="no-such-fusion"), "fitted fusion 'no-such-fusion'"),
        (FusionRequest(["a"] * (LIMITS.max_adapters + 1), "linear"), f"at most {LIMITS.max_adapters} adapters"),
    ],
)
def test_bad_requests_are_one_sentence_and_the_engine_keeps_working(engine, request_, message):
    ids = torch.randint(3, 90, (1, 5))
    good, _ = engine.logits(FusionRequest(["lang-a", "task-b"], "linear"), ids)
    with pytest.raises(FusionError, match=message) as caught:
        engine.logits(request_, ids)
    assert "\n" not in str(caught.value)
    again, _ = engine.logits(FusionRequest(["lang-a", "task-b"], "linear"), ids)
    torch.testing.assert_close(again, good, atol=0, rtol=0)
    assert sorted(engine.library.adapters) == ["lang-a", "task-b"]


def test_huge_declared_rank_and_foreign_architecture_are_refused(engine, tmp_path):
    folder = write_lora(tmp_path / "huge", engine.model, seed=3)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["r"] = 10**9
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(FusionError, match="declares rank r=1000000000"):
        engine.library.get_adapter(str(folder))
    gpt2 = tmp_path / "gpt2-lora"
    gpt2.mkdir()
    (gpt2 / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["c_attn"]})
    )
    from safetensors.torch import save_file

    save_file(
        {
            "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight": torch.zeros(4, 32),
            "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight": torch.zeros(96, 4),
        },
        str(gpt2 / "adapter_model.safetensors"),
    )
    with pytest.raises(FusionError, match="c_attn.lora_A.weight is not a LoRA weight of a decoder-layer projection"):
        engine.library.get_adapter(str(gpt2))


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-m", "fusion", "generate", "--model", str(tmp_path / "missing"), "--prompt", "hi"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: model ")
    result = subprocess.run(
        [sys.executable, "-m", "fusion", "fit", "--method", "lora_flow", "--data", "x.jsonl"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 2 and "needs --out FOLDER or --save-as NAME" in result.stderr


_SLOW_SAVE = textwrap.dedent("""
    import sys, time, torch
    import safetensors.torch as st
    from fusion.artifacts import FusionArtifact, save_artifact
    real = st.save_file
    def slow(tensors, path, *a, **k):
        real(tensors, path, *a, **k)
        with open(path, "r+b") as handle:  # leave a visibly half-written file behind
            handle.truncate(10)
        print("writing", flush=True)
        time.sleep(60)
    st.save_file = slow
    artifact = FusionArtifact("gates", "lora_flow", ["lang-a", "task-b"], tensors={"gate.0.weight": torch.ones(2, 4)})
    save_artifact(artifact, sys.argv[1], overwrite=True)
""")


def test_a_save_killed_midway_leaves_the_previous_artifact_intact(tmp_path):
    target = tmp_path / "fusions" / "gates"
    old = FusionArtifact(
        "gates",
        "lora_flow",
        ["lang-a", "task-b"],
        params={"temperature": 1.1},
        tensors={"gate.0.weight": torch.full((2, 4), 3.0)},
    )
    save_artifact(old, target)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", _SLOW_SAVE, str(target)], stdout=subprocess.PIPE, text=True, env=env, cwd=REPO
    )
    try:
        assert proc.stdout.readline().strip() == "writing"  # mid-save: the new tensors file is half written
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    survivor = load_artifact(target)
    assert survivor.params == {"temperature": 1.1}
    assert torch.equal(survivor.tensors["gate.0.weight"], torch.full((2, 4), 3.0))
    visible = [p.name for p in (tmp_path / "fusions").iterdir() if not p.name.startswith(".")]
    assert visible == ["gates"]  # the half-written copy exists only as a hidden temporary folder
    model = tiny_model(seed=2, layers=2)
    engine = Engine(
        base=BaseModel(model, None, "tiny", torch.device("cpu"), torch.float32),
        adapters_dir=tmp_path / "adapters",
        fusions_dir=tmp_path / "fusions",
    )
    assert list(engine.library.fusions) == ["gates"] and not engine.library.errors
