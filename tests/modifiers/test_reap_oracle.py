"""REAPModifier keeps exactly what llm-compressor's REAPPruningModifier keeps."""

import pytest
from llmcompressor.modifiers.pruning.reap import REAPPruningModifier

from ream_modifiers import REAPModifier
from tests.conftest import run_modifier


@pytest.mark.parametrize(
    "model_type, sparsity",
    [("qwen3_moe", 0.25), ("qwen3_moe", 0.5), ("deepseek_v3", 0.5)],
)
def test_reap_matches_upstream(load_tiny, calibration, tmp_path, model_type, sparsity):
    dataset = calibration(model_type)
    reports = []
    for modifier in (
        REAPPruningModifier(sparsity=sparsity, report_path=str(tmp_path / "up.json")),
        REAPModifier(sparsity=sparsity, report_path=str(tmp_path / "ours.json")),
    ):
        model, tokenizer, _ = load_tiny(model_type)
        reports.append(run_modifier(model, tokenizer, dataset, modifier))
    upstream, ours = reports[0], reports[1]["layers"]
    assert set(upstream) == set(ours)
    for layer, retained in upstream.items():
        assert ours[layer]["kept"] == retained, layer
    # the oracle must be informative: some layer drops experts other than the last
    assert any(
        o["removed"] != list(range(8 - len(o["removed"]), 8)) for o in ours.values()
    )
