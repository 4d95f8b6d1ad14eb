"""LoRA folders in every format we read give peft's own logits; bad files fail with one sentence.

Each format case writes a folder, asks the engine for `single` on it (by folder path), and
compares with peft's forward of the very same folder (or the peft model that saved it).
Each validation case asserts the message names the file, the tensor and what was expected,
and that a refused import leaves the library as it was.
"""

from __future__ import annotations

import json
import re
import tempfile
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import HIDDEN, LAYERS, SPECS, build_studio
from fixtures_formats import (
    forward_logits,
    peft_logits,
    peft_model,
    write_code_payload_bin,
    write_config,
    write_legacy_bin,
    write_peft_saved,
    zip_folder,
)
from helpers import MODULES, lora_state, tiny_model, write_lora

from fusion.adapters import load_lora
from fusion.engine import FusionRequest
from fusion.errors import FusionError
from fusion.library import Library

TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def importer(tmp_path_factory):
    """A private studio for this module: imports may change its library."""
    return build_studio(tmp_path_factory.mktemp("importer"), (SPECS["lang-a"], SPECS["task-b"]))


def ours_single(studio, folder: Path, ids) -> torch.Tensor:
    logits, _ = studio.engine.logits(FusionRequest([str(folder)], "single"), ids)
    return logits


def assert_equals_peft_folder(studio, folder: Path, seed: int = 0):
    ids = studio.ids(seed=seed)
    expected = peft_logits(peft_model(studio.pristine, [folder]), "a0", ids)
    ours = ours_single(studio, folder, ids)
    torch.testing.assert_close(ours, expected, **TOL)
    assert not torch.allclose(ours, forward_logits(studio.pristine, ids), atol=1e-3)


# ---- formats ----------------------------------------------------------------------------------
def test_safetensors_folder_matches_peft(studio):
    assert_equals_peft_folder(studio, studio.folders["lang-a"])
    assert_equals_peft_folder(studio, studio.folders["task-c"], seed=1)  # alpha 16, four modules only


def test_legacy_fp16_bin_without_adapter_name_matches_peft(studio, tmp_path):
    """LoRA-Flow's released LoRAs: torch.save'd fp16 dict, `...q_proj.lora_A.weight` keys."""
    state = lora_state(studio.pristine, rank=4, seed=21)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in state
    folder = write_legacy_bin(tmp_path / "legacy", state, rank=4, alpha=16)
    assert not (folder / "adapter_model.safetensors").exists()
    assert_equals_peft_folder(studio, folder)
    adapter = load_lora(folder, model=studio.pristine)
    assert adapter.factors[(0, "q_proj")].A.dtype == torch.float32 and adapter.rank == 4


def test_keys_with_adapter_name_read_like_keys_without(studio, tmp_path):
    """A state dict taken from a live PeftModel keeps `.default.` in its keys."""
    state = lora_state(studio.pristine, rank=4, seed=22)
    named = {
        k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): v for k, v in state.items()
    }
    plain = write_lora(tmp_path / "plain", studio.pristine, rank=4, alpha=8, state=state)
    with_name = write_lora(tmp_path / "named", studio.pristine, rank=4, alpha=8, state=named)
    ids = studio.ids(seed=2)
    torch.testing.assert_close(
        ours_single(studio, with_name, ids), peft_logits(peft_model(studio.pristine, [plain]), "a0", ids), **TOL
    )


def test_peft_save_pretrained_output_matches_peft(studio, tmp_path):
    folder, model = write_peft_saved(tmp_path / "peft-saved", studio.pristine)
    assert (folder / "adapter_model.safetensors").is_file()
    ids = studio.ids(seed=3)
    with torch.no_grad():
        expected = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(ours_single(studio, folder, ids), expected, **TOL)


def test_rslora_scaling_matches_peft(studio, tmp_path):
    folder = write_lora(tmp_path / "rs", studio.pristine, rank=4, alpha=8, seed=23, use_rslora=True)
    assert_equals_peft_folder(studio, folder)
    adapter = load_lora(folder, model=studio.pristine)
    assert adapter.factors[(1, "v_proj")].scale == pytest.approx(8 / 4**0.5)  # alpha / sqrt(r)


def test_peft_saved_rslora_matches_peft(studio, tmp_path):
    folder, model = write_peft_saved(tmp_path / "peft-rs", studio.pristine, seed=8, use_rslora=True)
    ids = studio.ids(seed=4)
    with torch.no_grad():
        expected = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(ours_single(studio, folder, ids), expected, **TOL)


def test_alpha_and_rank_pattern_by_module_name_match_peft(studio, tmp_path):
    folder, model = write_peft_saved(
        tmp_path / "pattern",
        studio.pristine,
        seed=9,
        alpha_pattern={"q_proj": 32, "down_proj": 2},
        rank_pattern={"v_proj": 2},
    )
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["alpha_pattern"] == {"q_proj": 32, "down_proj": 2}
    ids = studio.ids(seed=5)
    with torch.no_grad():
        expected = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(ours_single(studio, folder, ids), expected, **TOL)
    adapter = load_lora(folder, model=studio.pristine)
    assert adapter.factors[(0, "q_proj")].scale == pytest.approx(32 / 4)
    assert adapter.factors[(2, "v_proj")].scale == pytest.approx(8 / 2)
    assert adapter.factors[(1, "down_proj")].scale == pytest.approx(2 / 4)


@pytest.mark.parametrize("key", ["model.layers.1.self_attn.o_proj", "self_attn.o_proj"])
def test_alpha_pattern_by_full_module_path_matches_peft(studio, tmp_path, key):
    folder, model = write_peft_saved(tmp_path / "pattern-path", studio.pristine, seed=10, alpha_pattern={key: 32})
    ids = studio.ids(seed=6)
    with torch.no_grad():
        expected = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(ours_single(studio, folder, ids), expected, **TOL)


def test_config_without_lora_alpha_matches_peft(studio, tmp_path):
    folder = write_lora(tmp_path / "no-alpha", studio.pristine, rank=4, seed=24)
    config = json.loads((folder / "adapter_config.json").read_text())
    del config["lora_alpha"]
    (folder / "adapter_config.json").write_text(json.dumps(config))
    assert_equals_peft_folder(studio, folder)


# ---- validation: every refusal names the file, the tensor and what was expected --------------
def _state(studio, **kwargs):
    return lora_state(studio.pristine, rank=4, seed=31, **kwargs)


def _key(layer, module, half):
    block = "self_attn" if module in MODULES[:4] else "mlp"
    return f"base_model.model.model.layers.{layer}.{block}.{module}.lora_{half}.weight"


def bad_wrong_hidden(studio, folder):
    other = tiny_model(seed=1, layers=LAYERS, hidden=48, vocab=len(studio.tokenizer))
    write_lora(folder, other, rank=4, alpha=8, seed=31)
    return (
        folder / "adapter_model.safetensors",
        r"layers\.\d\.\w+_proj\.lora_[AB] has shape \(\d+, \d+\); expected \(\d+, \d+\) for this base model",
    )


def bad_too_many_layers(studio, folder):
    other = tiny_model(seed=1, layers=LAYERS + 2, hidden=HIDDEN, vocab=len(studio.tokenizer))
    write_lora(folder, other, rank=4, alpha=8, seed=31)
    return (
        folder / "adapter_model.safetensors",
        rf"layers\.{LAYERS}\.\w+_proj refers to layer {LAYERS}, but the base model has {LAYERS} layers",
    )


def bad_missing_b(studio, folder):
    state = _state(studio)
    del state[_key(1, "k_proj", "B")]
    write_lora(folder, studio.pristine, state=state)
    return folder / "adapter_model.safetensors", r"layers\.1\.k_proj has no lora_B tensor"


def bad_rank_mismatch(studio, folder):
    state = _state(studio)
    state[_key(2, "up_proj", "B")] = state[_key(2, "up_proj", "B")][:, :3].contiguous()
    write_lora(folder, studio.pristine, state=state)
    return (
        folder / "adapter_model.safetensors",
        r"layers\.2\.up_proj lora_A has rank 4 but lora_B has rank 3; they must match",
    )


def bad_nan(studio, folder):
    state = _state(studio)
    state[_key(0, "o_proj", "A")][0, 0] = float("nan")
    write_lora(folder, studio.pristine, state=state)
    return folder / "adapter_model.safetensors", r"layers\.0\.o_proj contains NaN or Inf values"


def bad_integer_dtype(studio, folder):
    state = _state(studio)
    state[_key(0, "q_proj", "A")] = torch.ones(4, HIDDEN, dtype=torch.int64)
    write_lora(folder, studio.pristine, state=state)
    return (
        folder / "adapter_model.safetensors",
        re.escape(_key(0, "q_proj", "A")) + r" has dtype torch.int64; a float type was expected",
    )


def bad_three_d_tensor(studio, folder):
    state = _state(studio)
    state[_key(0, "q_proj", "A")] = state[_key(0, "q_proj", "A")].unsqueeze(0).contiguous()
    write_lora(folder, studio.pristine, state=state)
    return (
        folder / "adapter_model.safetensors",
        re.escape(_key(0, "q_proj", "A")) + r" must be 2-D, got shape \(1, 4, 32\)",
    )


def bad_truncated_safetensors(studio, folder):
    write_lora(folder, studio.pristine, rank=4, alpha=8, seed=31)
    path = folder / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path, r"is not a readable safetensors file"


def bad_not_a_projection(studio, folder):
    state = _state(studio)
    state["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.zeros(4, 10)
    write_lora(folder, studio.pristine, state=state)
    return (
        folder / "adapter_model.safetensors",
        r"tensor base_model\.model\.model\.embed_tokens\.lora_embedding_A is not a LoRA weight of a "
        r"decoder-layer projection \(expected \.\.\.layers\.N\.self_attn\|mlp\.X_proj\.lora_A\|B\.weight\)",
    )


def bad_dora(studio, folder):
    state = _state(studio)
    state["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"] = torch.ones(HIDDEN)
    write_lora(folder, studio.pristine, state=state)
    return folder / "adapter_model.safetensors", r"lora_magnitude_vector is a DoRA magnitude"


def bad_no_lora_tensors(studio, folder):
    write_lora(folder, studio.pristine, state={"lm_head.weight": torch.zeros(3, 3)})
    return (
        folder / "adapter_model.safetensors",
        r"no LoRA tensors found \(expected keys like base_model\.model\.model\.layers\.0",
    )


def bad_non_utf8_config(studio, folder):
    write_lora(folder, studio.pristine, rank=4, alpha=8, seed=31)
    (folder / "adapter_config.json").write_bytes(b'{"peft_type": "LORA", "r": 4, "note": "\xff\xfe"}')
    return folder / "adapter_config.json", r"is not valid UTF-8 text"


def bad_invalid_json(studio, folder):
    write_lora(folder, studio.pristine, rank=4, alpha=8, seed=31)
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4,')
    return folder / "adapter_config.json", r"is not valid JSON"


def bad_other_peft_type(studio, folder):
    write_lora(folder, studio.pristine, rank=4, alpha=8, seed=31)
    write_config(folder, peft_type="IA3")
    return folder, r"adapter type 'IA3' is not supported"


def bad_rank_in_config(studio, folder):
    write_lora(folder, studio.pristine, rank=4, alpha=8, seed=31)
    write_config(folder, r="four")
    return folder, r"adapter_config\.json declares rank r='four'; expected an integer in 1\.\.4096"


def bad_no_weights(studio, folder):
    write_config(folder)
    return folder, r"no adapter_model\.safetensors or adapter_model\.bin found"


def bad_config_of_another_architecture(studio, folder):
    """Llama-named tensors under a config written for a model with fused attention."""
    write_lora(folder, studio.pristine, rank=4, alpha=8, seed=31)
    write_config(folder, target_modules=["query_key_value", "dense"])
    return folder / "adapter_config.json", r"target_modules \(query_key_value, dense\) do not name [a-z_]+_proj"


def bad_config_naming_fewer_modules(studio, folder):
    write_lora(folder, studio.pristine, rank=4, alpha=8, seed=31)
    write_config(folder, target_modules=["q_proj", "v_proj"])
    return folder / "adapter_config.json", r"target_modules \(q_proj, v_proj\) do not name (?!q_proj|v_proj)"


def bad_config_pattern_missing_modules(studio, folder):
    write_lora(folder, studio.pristine, rank=4, alpha=8, seed=31)
    write_config(folder, target_modules=r".*\.self_attn\.(q|v)_proj")
    return folder / "adapter_config.json", r"do not name (?!q_proj|v_proj)[a-z_]+_proj"


BAD_FOLDERS = [
    bad_config_of_another_architecture,
    bad_config_naming_fewer_modules,
    bad_config_pattern_missing_modules,
    bad_wrong_hidden,
    bad_too_many_layers,
    bad_missing_b,
    bad_rank_mismatch,
    bad_nan,
    bad_integer_dtype,
    bad_three_d_tensor,
    bad_truncated_safetensors,
    bad_not_a_projection,
    bad_dora,
    bad_no_lora_tensors,
    bad_non_utf8_config,
    bad_invalid_json,
    bad_other_peft_type,
    bad_rank_in_config,
    bad_no_weights,
]


def library_snapshot(studio):
    adapters_dir = studio.engine.library.adapters_dir
    return (
        json.dumps(studio.engine.adapters(), sort_keys=True),
        sorted(p.name for p in adapters_dir.iterdir()),
        studio.engine.library.version,
    )


@pytest.mark.parametrize(
    "targets",
    [
        list(MODULES),
        [f"self_attn.{m}" if m in ("q_proj", "k_proj", "v_proj", "o_proj") else f"mlp.{m}" for m in MODULES],
        r".*\.(q|k|v|o|gate|up|down)_proj",
        "all-linear",
        None,
    ],
)
def test_target_modules_that_describe_the_tensors_are_accepted(studio, tmp_path, targets):
    folder = write_lora(tmp_path / "ok", studio.pristine, rank=4, alpha=8, seed=33)
    write_config(folder, target_modules=targets)
    assert len(load_lora(folder, "ok", studio.pristine).factors) == len(
        load_lora(write_lora(tmp_path / "ref", studio.pristine, rank=4, alpha=8, seed=33), "ref").factors
    )


@pytest.mark.parametrize("make", BAD_FOLDERS, ids=[f.__name__[4:] for f in BAD_FOLDERS])
def test_bad_adapter_is_refused_with_a_named_cause(importer, tmp_path, make):
    folder = tmp_path / "bad-adapter"
    folder.mkdir()
    named, message = make(importer, folder)
    pattern = re.escape(str(named)) + r".*" + message
    with pytest.raises(FusionError, match=pattern) as refused:
        importer.engine.plan(FusionRequest([str(folder)], "single"))
    assert "\n" not in str(refused.value)  # one readable line
    before = library_snapshot(importer)
    with pytest.raises(FusionError, match=pattern):
        importer.engine.library.import_adapter(folder, name="bad-adapter")
    assert library_snapshot(importer) == before


def test_code_payload_pickle_is_refused_without_running(importer, tmp_path):
    marker = tmp_path / "payload-ran"
    folder = write_code_payload_bin(tmp_path / "evil", lora_state(importer.pristine, rank=4, seed=32), marker)
    weights = folder / "adapter_model.bin"
    refused = re.escape(str(weights)) + r" was refused: it is a pickle that holds more than tensors"
    with pytest.raises(FusionError, match=refused):
        importer.engine.plan(FusionRequest([str(folder)], "single"))
    with pytest.raises(FusionError, match=re.escape(str(weights)) + r" was refused"):
        importer.engine.library.import_adapter(folder, name="evil")
    assert not marker.exists()
    assert "evil" not in [a["name"] for a in importer.engine.adapters()]
    # The payload is live: an unsafe load would have run it.
    control = tmp_path / "control-ran"
    write_code_payload_bin(tmp_path / "control", {}, control)
    torch.load(tmp_path / "control" / "adapter_model.bin", weights_only=False)
    assert control.exists()


def test_bad_folder_in_library_is_listed_not_fatal(tmp_path):
    studio = build_studio(tmp_path, (SPECS["lang-a"],))
    bad_nan(studio, tmp_path / "adapters" / "broken")
    library = Library(studio.engine.model, tmp_path / "adapters", tmp_path / "fusions")
    assert list(library.adapters) == ["lang-a"]
    assert re.search(r"broken.*layers\.0\.o_proj contains NaN or Inf values", library.errors["broken"])
    with pytest.raises(FusionError, match=r"layers\.0\.o_proj contains NaN or Inf values"):
        library.get_adapter("broken")


# ---- zip import -------------------------------------------------------------------------------
def test_zip_with_parent_path_is_refused_and_library_unchanged(importer, tmp_path):
    archive = zip_folder(
        importer.folders["task-b"], tmp_path / "sneaky.zip", prefix="sneaky/", extra={"../escaped.txt": b"outside"}
    )
    before = library_snapshot(importer)
    with pytest.raises(
        FusionError, match=r"sneaky\.zip: entry '\.\./escaped\.txt' points outside the archive; refused"
    ):
        importer.engine.library.import_adapter(archive)
    assert library_snapshot(importer) == before
    assert not list(tmp_path.parent.rglob("escaped.txt"))
    assert not list(importer.engine.library.adapters_dir.parent.rglob("escaped.txt"))
    assert not (Path(tempfile.gettempdir()) / "escaped.txt").exists()  # where extraction would land


@pytest.mark.parametrize(
    "entry,message",
    [
        ("/abs/adapter_config.json", r"entry '/abs/adapter_config\.json' points outside the archive"),
        ("a/../../up.txt", r"entry 'a/\.\./\.\./up\.txt' points outside the archive"),
    ],
)
def test_zip_with_absolute_or_nested_parent_path_is_refused(importer, tmp_path, entry, message):
    archive = zip_folder(importer.folders["task-b"], tmp_path / "odd.zip", extra={entry: b"{}"})
    before = library_snapshot(importer)
    with pytest.raises(FusionError, match=message):
        importer.engine.library.import_adapter(archive)
    assert library_snapshot(importer) == before


def test_zip_with_symlink_is_refused(importer, tmp_path):
    archive = zip_folder(importer.folders["task-b"], tmp_path / "link.zip")
    with zipfile.ZipFile(archive, "a") as zf:
        info = zipfile.ZipInfo("adapter_model.bin")
        info.external_attr = 0o120777 << 16
        zf.writestr(info, "/etc/passwd")
    before = library_snapshot(importer)
    with pytest.raises(FusionError, match=r"link\.zip: entry 'adapter_model\.bin' is a symbolic link; refused"):
        importer.engine.library.import_adapter(archive)
    assert library_snapshot(importer) == before


def test_zip_with_broken_adapter_is_refused_and_leaves_nothing(importer, tmp_path):
    bad_rank_mismatch(importer, tmp_path / "broken-rank")
    archive = zip_folder(tmp_path / "broken-rank", tmp_path / "broken-rank.zip", prefix="inner/")
    before = library_snapshot(importer)
    with pytest.raises(FusionError, match=r"adapter_model\.safetensors: layers\.2\.up_proj lora_A has rank 4"):
        importer.engine.library.import_adapter(archive)
    assert library_snapshot(importer) == before


def test_good_zip_import_appears_and_matches_peft(importer, tmp_path):
    source = write_lora(tmp_path / "src", importer.pristine, rank=4, alpha=8, seed=33)
    archive = zip_folder(source, tmp_path / "task-zipped.zip", prefix="task-zipped/")
    adapter = importer.engine.library.import_adapter(archive)
    assert adapter.name == "task-zipped"
    listed = {a["name"]: a for a in importer.engine.adapters()}
    assert listed["task-zipped"]["rank"] == 4 and listed["task-zipped"]["role"] == "task"
    assert (importer.engine.library.adapters_dir / "task-zipped" / "adapter_model.safetensors").is_file()
    ids = importer.ids(seed=7)
    ours, _ = importer.engine.logits(FusionRequest(["task-zipped"], "single"), ids)
    torch.testing.assert_close(ours, peft_logits(peft_model(importer.pristine, [source]), "a0", ids), **TOL)
    # The same name again is refused unless overwriting is asked for.
    with pytest.raises(FusionError, match="already exists"):
        importer.engine.library.import_adapter(archive)
    importer.engine.library.import_adapter(archive, overwrite=True, role="language")
    assert {a["name"]: a for a in importer.engine.adapters()}["task-zipped"]["role"] == "language"
