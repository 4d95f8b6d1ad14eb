"""Token labels of traces: characters split over byte-level tokens are shown whole."""

from __future__ import annotations

import pytest

from fusion.errors import FusionError
from fusion.generate import PART_OF_NEXT, token_labels


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from fusion.model import dense_default_copy

    try:
        return AutoTokenizer.from_pretrained(str(dense_default_copy(lambda *a: None)))
    except FusionError as exc:
        pytest.skip(f"the embedded model is unavailable: {exc}")


@pytest.mark.parametrize("text", ["答案是23。", "Ответ: 23.", "La respuesta es 94.", "emoji 🧮 ok"])
def test_labels_rebuild_the_text_and_never_show_replacement_characters(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    labels = token_labels(tokenizer, ids)
    assert len(labels) == len(ids)
    assert not any("\ufffd" in label for label in labels)
    assert "".join(l for l in labels if l != PART_OF_NEXT) == tokenizer.decode(ids) == text


def test_split_character_sits_on_its_last_token(tokenizer):
    ids = tokenizer.encode("🧮", add_special_tokens=False)
    assert len(ids) > 1  # the emoji is several byte-level tokens in this vocabulary
    labels = token_labels(tokenizer, ids)
    assert labels[:-1] == [PART_OF_NEXT] * (len(ids) - 1) and labels[-1] == "🧮"
    # plain words are one label per token, as the tokenizer splits them
    ids = tokenizer.encode("hello world", add_special_tokens=False)
    assert token_labels(tokenizer, ids) == [tokenizer.decode([i]) for i in ids]


def test_highlighted_reply_leaves_partial_tokens_empty():
    import torch

    from fusion.plots import token_scores
    from fusion.trace import Trace

    trace = Trace(
        torch.tensor([[[0.5, 0.5]], [[0.2, 0.8]], [[0.9, 0.1]]]),
        ["Q", PART_OF_NEXT, "答"],
        ["lang-zh", "task-math"],
        "gate",
        "lora_flow",
        prompt_tokens=1,
    )
    scores = token_scores(trace)
    assert [text for text, _ in scores] == ["", "答"]
    assert [s for _, s in scores] == [0.6, -0.8]  # task minus language weight


def test_split_characters_read_as_text_on_the_heatmap_axis_and_in_hover():
    import torch

    from fusion import plots
    from fusion.trace import Trace

    tokens = ["Q", PART_OF_NEXT, "答", PART_OF_NEXT, PART_OF_NEXT, "案是", "О", "т"]
    assert plots.readable_tokens(tokens) == ["Q", "·答", "答", "·案", "·案", "案是", "О", "т"]
    assert plots.readable_tokens([PART_OF_NEXT]) == [PART_OF_NEXT]  # never completed: left as it was
    trace = Trace(torch.rand(len(tokens), 2, 2), tokens, ["lang-zh", "task-math"], "gate", "lora_flow", prompt_tokens=1)
    figure = plots.heatmap(trace, plots.VIEW_ALL)
    assert list(figure.layout.xaxis.ticktext) == ["Q", "·答", "答", "·案", "·案", "案是", "О", "т"]
    assert "part of '案'" in figure.data[0].text[0][3]
