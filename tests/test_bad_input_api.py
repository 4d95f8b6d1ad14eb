"""Bad input through the web API, the adapter import handler and the CLI, and the app's exposure.

Every case must come back as one readable sentence (no stack trace), the server must then answer
a normal request exactly as it did before any bad input, and the adapter library must be
unchanged (same names, same files). A pickle carrying code must never run. The app serves
loopback by default, warns when exposed without a password, limits uploads, and nothing in the
repository lets a model or adapter file run code.

Engine-level cases are in tests/test_adapters.py (bad adapter folders, zips and pickles: 23 tests)
and tests/test_reliability.py (prompts, requests, ranks, architectures, CLI exit codes and
interrupted saves: 17 tests); this module sends the same kinds of input through the app and the
command line.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from app_fixtures import app_engine, running_app  # noqa: F401  (fixtures)
from fixtures_formats import CodePayload, write_code_payload_bin, zip_folder
from helpers import lora_state, tiny_model, write_lora

pytestmark = pytest.mark.filterwarnings(
    "ignore::DeprecationWarning", "ignore::UserWarning", "ignore:.*(no_silent_downcasting|copy keyword)"
)

NORMAL = (["lang-es", "task-math"], "lora_flow", "{}", "What is 2 + 3?", 2, 0.0)
GOOD_JSONL = json.dumps({"prompt": "What is 1 + 1?", "response": "2"})
LAYERS, HIDDEN = 30, 576  # SmolLM2-135M


# ---- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(app_engine):
    with running_app(app_engine) as (demo, url):
        yield demo, url


@pytest.fixture(scope="module")
def client(served):
    from gradio_client import Client

    return Client(served[1], verbose=False)


@pytest.fixture(scope="module")
def normal_reply(client) -> dict:
    """The normal request's reply, taken before any bad input reached the server."""
    return client.predict(*NORMAL, api_name="/generate")


@pytest.fixture(scope="module")
def bad(app_engine, tmp_path_factory) -> dict[str, str]:
    """Bad files on the server's disk, by case name."""
    from mixlora_helpers import mixlora_config, mixlora_state, write_mixlora

    from fusion.methods.lora_flow import save_released_gates

    root = tmp_path_factory.mktemp("bad-inputs")
    model = app_engine.model
    files = {"root": str(root)}

    files["wrong_hidden"] = str(write_lora(root / "wrong-hidden", tiny_model(seed=1, layers=2, hidden=48), seed=3))

    state = lora_state(model, rank=4, seed=21, std=0.02)
    state["base_model.model.model.layers.3.self_attn.o_proj.lora_A.weight"][0, 0] = float("nan")
    files["nan"] = str(write_lora(root / "nan", model, state=state))

    truncated = write_lora(root / "truncated", model, state=lora_state(model, rank=4, seed=22, std=0.02))
    data = (truncated / "adapter_model.safetensors").read_bytes()
    (truncated / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    files["truncated"] = str(truncated)

    files["payload_marker"] = str(root / "payload-ran")
    files["payload"] = str(write_code_payload_bin(root / "payload", {}, Path(files["payload_marker"])))

    non_utf8 = write_lora(root / "non-utf8", model, state=lora_state(model, rank=4, seed=23, std=0.02))
    (non_utf8 / "adapter_config.json").write_bytes(b'{"peft_type": "LORA", "r": 4, "note": "\xff\xfe"}')
    files["non_utf8"] = str(non_utf8)

    huge = write_lora(root / "huge-rank", model, state=lora_state(model, rank=4, seed=24, std=0.02))
    config = json.loads((huge / "adapter_config.json").read_text())
    config["r"] = 10**9
    (huge / "adapter_config.json").write_text(json.dumps(config))
    files["huge_rank"] = str(huge)

    config = mixlora_config("default", num_experts=2, top_k=1, rank=2, alpha=4)
    del config["num_experts"]
    files["mixlora_no_experts"] = str(
        write_mixlora(
            root / "mixlora-no-experts", config, mixlora_state(model, num_experts=2, rank=2, seed=25), fmt="safetensors"
        )
    )
    (root / "empty").mkdir()
    files["empty"] = str(root / "empty")

    save_released_gates(torch.zeros(LAYERS, 3, HIDDEN), torch.zeros(LAYERS, 1, 3), root / "gates-k3.pt")
    files["gates_k3"] = str(root / "gates-k3.pt")
    files["gates_payload_marker"] = str(root / "gates-payload-ran")
    torch.save(
        {"encoder.layers.0.lora_fusion_gate.weight": CodePayload(Path(files["gates_payload_marker"]))},
        str(root / "gates-payload.pt"),
    )
    files["gates_payload"] = str(root / "gates-payload.pt")

    good = write_lora(root / "good", model, state=lora_state(model, rank=4, seed=26, std=0.02))
    files["zip_parent"] = str(
        zip_folder(good, root / "sneaky.zip", prefix="sneaky/", extra={"../escaped.txt": b"outside"})
    )
    files["zip_payload"] = str(zip_folder(Path(files["payload"]), root / "payload.zip", prefix="payload/"))
    (root / "not-a-zip.zip").write_bytes(b"PK\x03\x04 this is not really a zip archive")
    files["not_a_zip"] = str(root / "not-a-zip.zip")
    files["good"] = str(good)
    for name, data in (("garbage-bin", b"rubbish, not weights\n"), ("empty-bin", b"")):
        folder = write_lora(root / name, model, fmt="bin", state={})
        (folder / "adapter_model.bin").write_bytes(data)
        files[name.replace("-", "_")] = str(folder)
    files["zip_garbage_bin"] = str(zip_folder(Path(files["garbage_bin"]), root / "garbage.zip", prefix="garbage/"))

    (root / "malformed.jsonl").write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c", "resp\n')
    files["malformed_jsonl"] = str(root / "malformed.jsonl")
    (root / "latin1.jsonl").write_bytes(b'{"prompt": "caf\xe9", "response": "ok"}\n')
    files["latin1_jsonl"] = str(root / "latin1.jsonl")
    (root / "good.jsonl").write_text(GOOD_JSONL + "\n")
    files["good_jsonl"] = str(root / "good.jsonl")
    return files


def library_state(engine) -> tuple:
    """What a user of the library sees: adapter and fusion names, and every file with its size."""
    files = []
    for folder in (engine.library.adapters_dir, engine.library.fusions_dir):
        if folder.is_dir():
            files += sorted(
                (str(p.relative_to(folder.parent)), p.stat().st_size) for p in folder.rglob("*") if p.is_file()
            )
    return (sorted(a["name"] for a in engine.adapters()), sorted(f["name"] for f in engine.fusions()), files)


def assert_one_sentence(message: str) -> None:
    assert message.strip(), "empty error message"
    assert "Traceback" not in message and 'File "' not in message, message
    assert "\n" not in message.strip(), message
    assert not message.startswith("unexpected error"), f"an error the code did not expect: {message}"
    assert len(message) < 800, message


def assert_still_serving(client, engine, normal_reply, before) -> None:
    again = client.predict(*NORMAL, api_name="/generate")
    assert again["text"] == normal_reply["text"] and again["trace"] == normal_reply["trace"]
    assert library_state(engine) == before


# ---- /generate, /compare and /fit ---------------------------------------------------------------------
def gen(adapters, method="linear", params="{}", prompt="Hi", new_tokens=2, temperature=0.0, fusion="", system=""):
    return "/generate", (adapters, method, params, prompt, new_tokens, temperature, fusion, system)


def fit(
    examples=GOOD_JSONL,
    method="lora_flow",
    adapters="lang-es,task-math",
    save_as="bad-fit",
    params="{}",
    epochs=1,
    lr=0.0,
    batch_size=1,
    max_steps=1,
):
    return "/fit", (method, adapters, examples, save_as, params, epochs, lr, batch_size, max_steps, False)


LIB = "lang-es,task-math"
API_CASES = {
    # adapter files on the server, named by path
    "wrong_hidden_size": (lambda f: gen(f["wrong_hidden"], "single"), r"has shape .*expected .* for this base model"),
    "nan_adapter": (lambda f: gen(f["nan"], "single"), r"layers\.3\.o_proj contains NaN or Inf values"),
    "truncated_safetensors": (lambda f: gen(f["truncated"], "single"), r"is not a readable safetensors file"),
    "pickle_with_code": (lambda f: gen(f["payload"], "single"), r"was refused: it is a pickle that holds more than"),
    "non_utf8_config": (lambda f: gen(f["non_utf8"], "single"), r"is not valid UTF-8 text"),
    "huge_declared_rank": (lambda f: gen(f["huge_rank"], "single"), r"declares rank r=1000000000"),
    "mixlora_without_num_experts": (
        lambda f: gen(f["mixlora_no_experts"], "mixlora"),
        r"has no 'num_experts'; a MixLoRA config needs it",
    ),
    "folder_without_config": (lambda f: gen(f["empty"], "single"), r"adapter_config\.json"),
    "a_file_not_a_folder": (
        lambda f: gen("/etc/passwd", "single"),
        r"neither in the library .* nor an existing folder",
    ),
    "gates_with_wrong_k": (
        lambda f: gen(LIB, "lora_flow", json.dumps({"gates": f["gates_k3"]})),
        r"has shape \(3, 576\); expected \(2, 576\)",
    ),
    "gates_pickle_with_code": (
        lambda f: gen(LIB, "lora_flow", json.dumps({"gates": f["gates_payload"]})),
        r"was refused: it is a pickle that holds more than",
    ),
    "gates_not_weights": (
        lambda f: gen(LIB, "lora_flow", json.dumps({"gates": "/etc/passwd"})),
        r"is not a readable torch weights file",
    ),
    "bin_adapter_of_rubbish": (lambda f: gen(f["garbage_bin"], "single"), r"is not a readable torch weights file"),
    "empty_bin_adapter": (lambda f: gen(f["empty_bin"], "single"), r"is not a readable torch weights file"),
    # prompts
    "empty_prompt": (lambda f: gen(LIB, prompt=""), r"the message is empty"),
    "one_megabyte_prompt": (lambda f: gen(LIB, prompt="x" * (1 << 20)), r"characters long; the limit is"),
    "control_characters_only": (lambda f: gen(LIB, prompt="\x00\x01\x07\x1b\x7f"), r"the message is empty"),
    "invisible_characters_only": (lambda f: gen(LIB, prompt="\u200b\u200e\ufeff"), r"the message is empty"),
    "one_megabyte_system_prompt": (lambda f: gen(LIB, system="s" * (1 << 20)), r"system prompt is \d+ characters"),
    # parameters and requests
    "zero_new_tokens": (lambda f: gen(LIB, new_tokens=0), r"max_new_tokens must lie in \[1, \d+\]"),
    "huge_new_tokens": (lambda f: gen(LIB, new_tokens=10**7), r"max_new_tokens must lie in \[1, \d+\]"),
    "negative_temperature": (lambda f: gen(LIB, temperature=-1.0), r"temperature must lie in \[0, 5\]"),
    "huge_temperature": (lambda f: gen(LIB, temperature=1e9), r"temperature must lie in \[0, 5\]"),
    "density_out_of_range": (lambda f: gen(LIB, "ties", '{"density": 7}'), r"'density'.*must lie in"),
    "weights_for_the_wrong_count": (lambda f: gen(LIB, "linear", '{"weights": "1, 2, 3"}'), r"got 3 weights for 2"),
    "gate_temperature_out_of_range": (lambda f: gen(LIB, "lora_flow", '{"temperature": 0}'), r"temperature"),
    "params_not_an_object": (lambda f: gen(LIB, "linear", "[1, 2]"), r"params must be a JSON object"),
    "params_not_json": (lambda f: gen(LIB, "linear", "{weights: 1"), r"params must be a JSON object"),
    "unknown_method": (lambda f: gen(LIB, "no_such_method"), r"unknown fusion method 'no_such_method'"),
    "unknown_adapter": (lambda f: gen("lang-es,nope"), r"adapter 'nope' is neither in the library"),
    "same_adapter_twice": (lambda f: gen("lang-es,lang-es"), r"the same adapter was chosen twice"),
    "too_many_adapters": (lambda f: gen(",".join(["lang-es"] * 9)), r"at most \d+ adapters"),
    "unknown_saved_fusion": (lambda f: gen("", "base", fusion="no-such-fusion"), r"fitted fusion 'no-such-fusion'"),
    "too_many_compare_columns": (
        lambda f: ("/compare", ("Hi", json.dumps([{"method": "base"}] * 5), 2, 0.0)),
        r"columns must be a JSON list of 1 to 4",
    ),
    "compare_column_not_an_object": (lambda f: ("/compare", ("Hi", "[1, 2]", 2, 0.0)), r"must be a JSON object"),
    # fitting
    "fit_jsonl_not_json": (lambda f: fit("not json"), r"examples line 1 is not valid JSON"),
    "fit_jsonl_cut_midway": (
        lambda f: fit(GOOD_JSONL + '\n{"prompt": "What is 2 + 2?", "resp'),
        r"examples line 2 is not valid JSON",
    ),
    "fit_jsonl_line_is_a_list": (lambda f: fit("[1, 2]"), r"examples line 1 must be a JSON object"),
    "fit_jsonl_missing_fields": (
        lambda f: fit('{"question": "a", "answer": "b"}'),
        r"needs string fields 'prompt' and 'response'",
    ),
    "fit_jsonl_bad_messages": (
        lambda f: fit('{"messages": [{"role": "user", "content": "hi"}]}'),
        r"ending with an assistant turn",
    ),
    "fit_no_examples": (lambda f: fit("\n\n"), r"examples holds no examples"),
    "fit_zero_epochs": (lambda f: fit(epochs=0), r"epochs must be at least 1"),
    "fit_negative_lr": (lambda f: fit(lr=-1.0), r"learning rate must be positive"),
    "fit_zero_batch": (lambda f: fit(batch_size=0), r"batch size must be at least 1"),
    "fit_unfittable_method": (lambda f: fit(method="linear"), r"method 'linear' has nothing to fit"),
    "fit_unknown_method": (lambda f: fit(method="no_such_method"), r"unknown fusion method"),
    "fit_name_with_a_path": (lambda f: fit(save_as="../escaped"), r"name '\.\./escaped' is not allowed"),
    "fit_with_a_bad_adapter": (lambda f: fit(adapters=f["nan"] + ",task-math"), r"contains NaN or Inf values"),
}


def cases(table: dict) -> list:
    return list(table)


@pytest.mark.parametrize("case", cases(API_CASES))
def test_bad_api_input_gets_one_sentence_and_changes_nothing(client, app_engine, normal_reply, bad, case):
    from gradio_client.exceptions import AppError

    make, expected = API_CASES[case]
    api_name, args = make(bad)
    before = library_state(app_engine)
    with pytest.raises(AppError) as refused:
        client.predict(*args, api_name=api_name)
    message = str(refused.value)
    assert_one_sentence(message)
    assert re.search(expected, message), message
    assert "root:" not in message  # nothing of a server file's content comes back
    assert not Path(bad["payload_marker"]).exists() and not Path(bad["gates_payload_marker"]).exists()
    assert_still_serving(client, app_engine, normal_reply, before)
    assert not (app_engine.library.fusions_dir / "bad-fit").exists()


def test_a_bad_compare_column_is_reported_in_its_own_row(client, app_engine, normal_reply, bad):
    before = library_state(app_engine)
    columns = [
        {"method": "lora_flow", "adapters": NORMAL[0]},
        {"method": "single", "adapters": [bad["nan"]]},
        {"method": "single", "adapters": [bad["payload"]]},
    ]
    rows = client.predict(NORMAL[3], json.dumps(columns), NORMAL[4], 0.0, api_name="/compare")
    assert rows[0]["error"] is None and rows[0]["text"] == normal_reply["text"]
    for row, expected in zip(rows[1:], ("contains NaN or Inf values", "was refused")):
        assert_one_sentence(row["error"])
        assert expected in row["error"] and row["text"] in ("", None)
    assert not Path(bad["payload_marker"]).exists()
    assert_still_serving(client, app_engine, normal_reply, before)


# ---- the Adapters tab's import handler ------------------------------------------------------------
def import_handler(demo):
    handlers = [fn.fn for fn in demo.fns.values() if getattr(fn.fn, "__name__", "") == "import_adapter"]
    assert len(handlers) == 1
    return handlers[0]


IMPORT_CASES = {
    # case: (folder path, uploaded zip, name) from the bad files, expected message
    "zip_with_parent_paths": (lambda f: ("", f["zip_parent"], ""), r"entry '\.\./escaped\.txt' points outside"),
    "zip_with_a_code_pickle": (lambda f: ("", f["zip_payload"], ""), r"was refused: it is a pickle"),
    "not_really_a_zip": (lambda f: ("", f["not_a_zip"], ""), r"is neither an adapter folder nor a zip file"),
    "folder_with_nan": (lambda f: (f["nan"], None, ""), r"contains NaN or Inf values"),
    "folder_with_wrong_hidden_size": (lambda f: (f["wrong_hidden"], None, ""), r"for this base model"),
    "folder_with_non_utf8_config": (lambda f: (f["non_utf8"], None, ""), r"is not valid UTF-8 text"),
    "mixlora_without_num_experts": (lambda f: (f["mixlora_no_experts"], None, ""), r"has no 'num_experts'"),
    "name_with_a_path": (lambda f: (f["good"], None, "../../escaped"), r"name '\.\./\.\./escaped' is not allowed"),
    "name_taken": (lambda f: (f["good"], None, "lang-es"), r"already exists"),
    "zip_with_a_bin_of_rubbish": (lambda f: ("", f["zip_garbage_bin"], ""), r"is not a readable torch weights file"),
}


@pytest.mark.parametrize("case", cases(IMPORT_CASES))
def test_bad_import_gets_one_sentence_and_changes_nothing(served, client, app_engine, normal_reply, bad, case):
    make, expected = IMPORT_CASES[case]
    folder, archive, name = make(bad)
    before = library_state(app_engine)
    *_, status = import_handler(served[0])(folder, archive, name, "", False)
    assert status.startswith("⚠ "), status
    message = status[2:]
    assert_one_sentence(message)
    assert re.search(expected, message), message
    assert not Path(bad["payload_marker"]).exists()
    root = Path(bad["root"])
    for place in (root.parent, app_engine.library.adapters_dir.parent):
        assert not list(place.rglob("escaped*"))
    assert_still_serving(client, app_engine, normal_reply, before)


# ---- the command line -------------------------------------------------------------------------------
LIB_ARGS = ["--adapters", LIB]
CLI_CASES = {
    "nan_adapter": (
        lambda f: ["generate", "--adapter", f["nan"], "--prompt", "Hi", "--max-new-tokens", "1"],
        r"contains NaN or Inf values",
    ),
    "pickle_with_code": (lambda f: ["generate", "--adapter", f["payload"], "--prompt", "Hi"], r"was refused"),
    "bin_adapter_of_rubbish": (
        lambda f: ["generate", "--adapter", f["garbage_bin"], "--prompt", "Hi"],
        r"is not a readable torch weights file",
    ),
    "gates_with_wrong_k": (
        lambda f: ["generate", *LIB_ARGS, "--method", "lora_flow", "--gates", f["gates_k3"], "--prompt", "Hi"],
        r"expected \(2, 576\)",
    ),
    "unknown_method": (
        lambda f: ["generate", *LIB_ARGS, "--method", "nope", "--prompt", "Hi"],
        r"unknown fusion method 'nope'",
    ),
    "param_without_value": (
        lambda f: ["generate", *LIB_ARGS, "--param", "weights", "--prompt", "Hi"],
        r"--param 'weights' must look like key=value",
    ),
    "zero_new_tokens": (
        lambda f: ["generate", *LIB_ARGS, "--prompt", "Hi", "--max-new-tokens", "0"],
        r"max_new_tokens must lie in",
    ),
    "top_p_out_of_range": (lambda f: ["generate", *LIB_ARGS, "--prompt", "Hi", "--top-p", "0"], r"top_p must lie in"),
    "control_characters_only": (lambda f: ["generate", *LIB_ARGS, "--prompt", "\x01\x02\x1b"], r"the message is empty"),
    "fit_malformed_jsonl": (
        lambda f: ["fit", *LIB_ARGS, "--method", "lora_flow", "--data", f["malformed_jsonl"], "--save-as", "bad-fit"],
        r"malformed\.jsonl line 2 is not valid JSON",
    ),
    "fit_non_utf8_jsonl": (
        lambda f: ["fit", *LIB_ARGS, "--method", "lora_flow", "--data", f["latin1_jsonl"], "--save-as", "bad-fit"],
        r"latin1\.jsonl is not UTF-8 text",
    ),
    "fit_missing_data": (
        lambda f: [
            "fit",
            *LIB_ARGS,
            "--method",
            "lora_flow",
            "--data",
            f["root"] + "/nope.jsonl",
            "--save-as",
            "bad-fit",
        ],
        r"nope\.jsonl does not exist",
    ),
    "fit_name_with_a_path": (
        lambda f: ["fit", *LIB_ARGS, "--method", "lora_flow", "--data", f["good_jsonl"], "--save-as", "../escaped"],
        r"name '\.\./escaped' is not allowed",
    ),
}


@pytest.mark.parametrize("case", cases(CLI_CASES))
def test_bad_cli_input_gets_one_line_and_exit_code_2(client, app_engine, normal_reply, bad, case, monkeypatch, capsys):
    """The CLI runs in this process on the already loaded engine (loading the model per case
    would take seconds); tests/test_reliability.py runs the real subprocess."""
    from fusion import cli

    monkeypatch.setattr(cli, "_engine", lambda args, quiet: app_engine)
    make, expected = CLI_CASES[case]
    before = library_state(app_engine)
    code = cli.main(make(bad))
    err = capsys.readouterr().err.strip()
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    assert_one_sentence(lines[0])
    assert re.search(expected, lines[0]), lines[0]
    assert not Path(bad["payload_marker"]).exists()
    assert_still_serving(client, app_engine, normal_reply, before)


def test_cli_argument_of_the_wrong_type_is_a_usage_error(capsys):
    from fusion import cli

    with pytest.raises(SystemExit) as stopped:
        cli.main(["generate", "--prompt", "Hi", "--max-new-tokens", "many"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "invalid int value: 'many'" in err.strip().splitlines()[-1]


# ---- exposure ---------------------------------------------------------------------------------------------
def launched_with(monkeypatch, argv: list[str]) -> dict:
    """app.main's launch arguments, with the engine and the app replaced by stand-ins."""
    from types import SimpleNamespace

    import app as app_module

    captured = {}

    class Demo:
        def launch(self, **kwargs):
            captured.update(kwargs)

    monkeypatch.setattr(app_module, "Engine", lambda **kwargs: SimpleNamespace(library_errors=lambda: {}))
    monkeypatch.setattr(app_module, "build_app", lambda engine: Demo())
    assert app_module.main(argv) == 0
    return captured


def test_the_app_serves_loopback_only_with_an_upload_limit_by_default(monkeypatch, capsys):
    from ui.constants import APP

    launched = launched_with(monkeypatch, [])
    assert launched["server_name"] == "127.0.0.1"
    assert launched["share"] is False and launched["auth"] is None
    assert launched["show_error"] is False  # errors reach the page as one line, never a stack trace
    assert launched["max_file_size"] == f"{APP.max_upload_mb}mb" and 0 < APP.max_upload_mb <= 4096
    assert "WARNING" not in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, warning",
    [
        (["--host", "0.0.0.0"], "binding 0.0.0.0 makes the studio reachable from other machines without a password"),
        (["--share"], "--share publishes the studio on a public link without a password"),
    ],
)
def test_exposing_the_app_without_auth_warns(monkeypatch, capsys, argv, warning):
    launched_with(monkeypatch, argv)
    err = capsys.readouterr().err
    assert f"WARNING: {warning}" in err and "add --auth USER:PASS" in err
    launched = launched_with(monkeypatch, [*argv, "--auth", "me:secret"])
    assert launched["auth"] == ("me", "secret")
    assert "WARNING" not in capsys.readouterr().err


def test_an_upload_over_the_limit_is_refused():
    import gradio as gr
    import httpx
    from app_fixtures import free_port

    with gr.Blocks() as demo:
        gr.File()
    port = free_port()
    try:
        demo.launch(
            server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, max_file_size="1kb"
        )
        url = f"http://127.0.0.1:{port}/gradio_api/upload"
        small = httpx.post(url, files=[("files", ("small.zip", b"x" * 100, "application/zip"))], timeout=30)
        big = httpx.post(url, files=[("files", ("big.zip", b"x" * 4096, "application/zip"))], timeout=30)
    finally:
        demo.close()
    assert small.status_code == 200
    assert big.status_code == 413 and "maximum allowed size" in big.text


REPO = Path(__file__).resolve().parent.parent
SKIPPED_FOLDERS = {".venv", ".git", "node_modules", "artifacts", "runs", "__pycache__"}


def repo_python_files():
    for path in sorted(REPO.rglob("*.py")):
        if not SKIPPED_FOLDERS & set(path.relative_to(REPO).parts):
            yield path


def test_no_code_is_ever_run_from_a_model_or_adapter_file():
    remote_code = re.compile("trust_remote" + r"_code['\"]?\s*[:=]\s*([^\s,)]+)")
    files = list(repo_python_files())
    assert len(files) > 30
    for path in files:
        for found in remote_code.finditer(path.read_text(encoding="utf-8")):
            assert found.group(1) == "False", f"{path.relative_to(REPO)} passes {found.group(0)}"
    # Adapters, gates and checkpoints reach the engine and the app from users: weights-only loading.
    unsafe = re.compile("weights_only" + r"\s*=\s*False|pickle\.loads?\(")
    for path in files:
        relative = path.relative_to(REPO)
        if relative.parts[0] in ("fusion", "ui", "app.py") and relative.parts[:2] != ("fusion", "lab"):
            assert not unsafe.search(path.read_text(encoding="utf-8")), f"{relative} loads a pickle unsafely"
