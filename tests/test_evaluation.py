import json
import math
from types import SimpleNamespace

import pytest
import torch

from ream_modifiers.evaluation import perplexity, read_jsonl_texts
from ream_modifiers.tiny import build_tokenizer


class UniformModel(torch.nn.Module):
    """Predicts every token with equal probability: perplexity = vocabulary size."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab))


def test_uniform_model_has_vocabulary_perplexity():
    tokenizer = build_tokenizer()
    value = perplexity(UniformModel(512), tokenizer, ["some text to score"], 16, 4, 3)
    assert value == pytest.approx(512.0)
    assert math.isfinite(value)


def test_read_jsonl_texts(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(
        json.dumps({"text": "a"}) + "\n\n" + json.dumps({"text": "b"}) + "\n"
    )
    assert read_jsonl_texts(path) == ["a", "b"]
