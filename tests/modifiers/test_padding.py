"""Padded calibration batches: padding tokens never enter the statistics."""

import json

import pytest
from datasets import Dataset
from llmcompressor import oneshot

from ream_modifiers import REAPModifier


def _ragged(lengths):
    rows = [[(7 * i + j) % 500 + 1 for j in range(n)] for i, n in enumerate(lengths)]
    return Dataset.from_dict(
        {"input_ids": rows, "attention_mask": [[1] * n for n in lengths]}
    )


def test_padding_tokens_are_excluded(load_tiny, tmp_path):
    lengths = [20, 12, 17, 9, 30, 5]
    model, tokenizer, _ = load_tiny("qwen3_moe")
    report = tmp_path / "r.json"
    oneshot(
        model=model,
        dataset=_ragged(lengths),
        processor=tokenizer,
        recipe=[REAPModifier(sparsity=0.25, report_path=str(report))],
        batch_size=2,
        data_collator="padding",
        num_calibration_samples=6,
        max_seq_length=None,
        shuffle_calibration_samples=False,
    )
    layers = json.loads(report.read_text())["layers"]
    for entry in layers.values():
        assert entry["calibration_tokens"] == sum(lengths)  # not 2 * (30+17+9) padded
        # top-2 routing: every real token counts twice, padding never
        assert sum(entry["frequency"]) == 2 * sum(lengths)


def test_padded_and_shuffled_batches_are_refused(load_tiny):
    model, tokenizer, _ = load_tiny("qwen3_moe")
    with pytest.raises(ValueError, match="padded and shuffled"):
        oneshot(
            model=model,
            dataset=_ragged([20, 12, 17, 9]),
            processor=tokenizer,
            recipe=[REAPModifier(sparsity=0.25)],
            batch_size=2,
            data_collator="padding",
            shuffle_calibration_samples=True,
            max_seq_length=None,
        )
