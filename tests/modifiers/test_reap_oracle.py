"""REAPModifier keeps exactly what llm-compressor's REAPPruningModifier keeps."""

import json

import pytest
from llmcompressor import oneshot
from llmcompressor.core import reset_session
from llmcompressor.modifiers.pruning.reap import REAPPruningModifier

from ream_modifiers import REAPModifier
from tests.conftest import NUM_SAMPLES, SEQ_LEN


@pytest.mark.parametrize(
    "model_type, sparsity",
    [("qwen3_moe", 0.25), ("qwen3_moe", 0.5), ("deepseek_v3", 0.5)],
)
def test_reap_matches_upstream(load_tiny, calibration, tmp_path, model_type, sparsity):
    dataset = calibration(model_type)
    kept = {}
    for name, modifier in (
        (
            "upstream",
            REAPPruningModifier(
                sparsity=sparsity, report_path=str(tmp_path / "up.json")
            ),
        ),
        (
            "ours",
            REAPModifier(sparsity=sparsity, report_path=str(tmp_path / "ours.json")),
        ),
    ):
        reset_session()
        model, tokenizer, _ = load_tiny(model_type)
        oneshot(
            model=model,
            dataset=dataset,
            recipe=[modifier],
            processor=tokenizer,
            num_calibration_samples=NUM_SAMPLES,
            max_seq_length=SEQ_LEN,
        )
        kept[name] = model
    upstream = json.loads((tmp_path / "up.json").read_text())
    ours = json.loads((tmp_path / "ours.json").read_text())["layers"]
    assert set(upstream) == set(ours)
    for layer, retained in upstream.items():
        assert ours[layer]["kept"] == retained, layer
    # the oracle must be informative: some layer drops experts other than the last
    assert any(
        o["removed"] != list(range(8 - len(o["removed"]), 8)) for o in ours.values()
    )
