"""`python -m fusion bench` end to end on the embedded model with tiny settings: every case
measured next to a base run, ratios, prefill, switch times and the table (the speed figures
themselves belong to docs/perf.md, not to a test)."""

from __future__ import annotations

import pytest

from fusion.bench import format_table, run_bench
from fusion.errors import FusionError


@pytest.fixture(scope="module")
def result():
    try:
        return run_bench(
            "default",
            methods=["linear", "lora_flow"],
            tokens=3,
            repeats=2,
            prefill=16,
            references="peft",
            log=lambda *a: None,
        )
    except FusionError as exc:
        pytest.skip(f"the default base model is unavailable: {exc}")


def test_cases_and_their_paired_measurements(result):
    names = [r["name"] for r in result["rows"]]
    assert names == [
        "base",
        "linear k=2 (merged)",
        "linear k=2 (unmerged)",
        "lora_flow k=2",
        "lora_flow k=4",
        "peft single (unmerged)",
        "peft 2 LoRAs (unmerged)",
    ]
    rows = {r["name"]: r for r in result["rows"]}
    assert rows["base"]["ratio_to_base"] == 1.0 and rows["base"]["prefill_overhead"] == 0.0
    # base is measured once next to every other case in each of the 2 rounds
    assert len(rows["base"]["runs"]) == 2 * (len(names) - 1)
    for name, row in rows.items():
        assert row["tokens_per_s"] > 0 and row["prefill_s"] > 0 and row["first_token_s"] > 0
        if name != "base":
            assert len(row["runs"]) == 2
            lo, hi = row["ratio_spread"]
            assert 0 < lo <= row["ratio_to_base"] <= hi
    assert rows["lora_flow k=2"]["switch_s"] > 0 and rows["linear k=2 (merged)"]["switch_s"] > 0
    assert rows["peft 2 LoRAs (unmerged)"]["switch_s"] is None
    assert set(result["speedups"]) == {
        "lora_flow k=2 vs peft 2 LoRAs (unmerged)",
        "linear k=2 (merged) vs peft 2 LoRAs (unmerged)",
    }
    assert result["machine"]["tokens"] == 3 and result["machine"]["repeats"] == 2


def test_table_lists_every_case(result):
    table = format_table(result)
    for row in result["rows"]:
        assert row["name"] in table
    assert "speed-up lora_flow k=2 vs peft 2 LoRAs (unmerged)" in table


def test_random_model_of_a_given_shape_runs_the_bench(tmp_path):
    """--model random:CONFIG builds random weights of that shape (the GPU benchmark's model)."""
    import json

    from fusion.model import load_base_model

    config = tmp_path / "config.json"
    config.write_text(
        json.dumps(
            {
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 3,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "vocab_size": 11,
            }
        )
    )
    try:
        base = load_base_model(f"random:{config}", progress=lambda *a: None)
    except FusionError as exc:
        pytest.skip(f"the embedded tokenizer is unavailable: {exc}")
    assert base.num_layers == 3 and base.hidden_size == 64
    assert base.config.vocab_size == len(base.tokenizer)  # sized to the tokenizer, not the file's 11
    assert base.info["source"] == ""
    result = run_bench(
        f"random:{config}",
        methods=["lora_flow", "mixlora"],
        tokens=2,
        repeats=1,
        prefill=8,
        references="all",
        log=lambda *a: None,
    )
    names = [r["name"] for r in result["rows"]]
    assert names == ["base", "lora_flow k=2", "lora_flow k=4", "mixlora 8x top-2"]  # no weights: no references
    with pytest.raises(FusionError, match="neither a known shape"):
        load_base_model("random:llama-9000", progress=lambda *a: None)


def test_concurrency_bench_on_a_small_random_shape(tmp_path):
    """`bench --concurrency` (the GPU script's path, here on CPU with a small random shape):
    every stream decodes exactly its budget on all three paths, so the token counts are known."""
    import json

    from fusion.batch_bench import format_table as batch_table
    from fusion.batch_bench import run_concurrency_bench

    config = tmp_path / "config.json"
    config.write_text(
        json.dumps(
            {
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "vocab_size": 11,
            }
        )
    )
    try:
        result = run_concurrency_bench(
            f"random:{config}", concurrency=(1, 3), token_range=(2, 5), rank=4, log=lambda *a: None, rounds=2
        )
    except FusionError as exc:
        pytest.skip(f"the embedded tokenizer is unavailable: {exc}")
    budgets = [2 + (i * 37) % 4 for i in range(3)]  # 2, 3, 4
    one, three = result["rows"]
    assert one["streams"] == 1 and three["streams"] == 3
    assert three["fusions"] == ["lora_flow k=2", "linear k=2", "cat k=2"]
    for row, expected in ((one, budgets[0]), (three, sum(budgets))):
        for path in ("thread_per_request", "scheduler", "scheduler_base_only"):
            assert row[path]["tokens"] == expected, path
            assert row[path]["tokens_per_s"] > 0
        assert len(row["rounds"]) == 2
        speedups = sorted(
            r["scheduler"]["tokens_per_s"] / r["thread_per_request"]["tokens_per_s"] for r in row["rounds"]
        )
        assert row["speedup"] == round((speedups[0] + speedups[1]) / 2, 2)  # the median of two rounds
        assert row["speedup_range"] == [round(speedups[0], 2), round(speedups[1], 2)]
        for r in row["rounds"]:
            for path in ("thread_per_request", "scheduler", "scheduler_base_only"):
                assert r[path]["tokens"] == expected, path
    assert three["scheduler"]["p50_inter_token_s"] > 0
    table = batch_table(result)
    assert "speed-up" in table and "rounds: 2" in table and result["machine"]["rank"] == 4
