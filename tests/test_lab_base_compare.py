"""The base-model measurement's pieces on a tiny model: bits per character, prompts, stop tokens."""

import math

import pytest
import torch
from fixtures_formats import tiny_tokenizer
from helpers import tiny_model

from lab import base_compare


def test_bits_per_char_is_the_mean_negative_log2_likelihood_per_character():
    tokenizer = tiny_tokenizer()  # one token per byte, no BOS added
    model = tiny_model(seed=3, vocab=len(tokenizer))
    texts = ["hola mundo", "привет"]
    nats = 0.0
    for text in texts:
        ids = torch.tensor(tokenizer(text).input_ids)
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids[None]).logits[0], -1)
        nats -= sum(logp[i, ids[i + 1]].item() for i in range(len(ids) - 1))
    chars = sum(len(t) for t in texts)
    bpc, tpc = base_compare.bits_per_char(model, tokenizer, texts)
    assert bpc == pytest.approx(nats / chars / math.log(2), rel=1e-5)
    # byte tokens: "hola mundo" is 10 bytes, "привет" 12 (two per Cyrillic letter)
    assert tpc == (10 + 12) / chars


def test_chat_prompt_and_stops_use_the_models_own_format():
    tokenizer = tiny_tokenizer()  # ChatML template
    ids = base_compare.chat_prompt(tokenizer, "hi")
    assert tokenizer.decode(ids[0]).endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert base_compare.stop_ids(tokenizer) == [2]
    tokenizer.chat_template = None  # no template and no Gemma turn tokens: refused
    with pytest.raises(ValueError, match="no chat template"):
        base_compare.chat_prompt(tokenizer, "hi")
