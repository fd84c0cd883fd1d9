import json

import torch
from llmcompressor import oneshot
from llmcompressor.core import reset_session

from ream_modifiers import REAPModifier
from ream_modifiers.moe import find_moe_layers
from tests.conftest import NUM_SAMPLES, SEQ_LEN


def _run(load_tiny, calibration, tmp_path, scale_expert=None, **kwargs):
    reset_session()
    model, tokenizer, _ = load_tiny("qwen3_moe")
    if scale_expert is not None:
        layer = find_moe_layers(model)[0]
        with torch.no_grad():
            layer.expert(scale_expert).down_proj.weight.mul_(1000.0)
    report = tmp_path / f"r{len(list(tmp_path.iterdir()))}.json"
    oneshot(
        model=model,
        dataset=calibration("qwen3_moe"),
        processor=tokenizer,
        recipe=[REAPModifier(report_path=str(report), **kwargs)],
        num_calibration_samples=NUM_SAMPLES,
        max_seq_length=SEQ_LEN,
    )
    return json.loads(report.read_text())["layers"]


def test_super_experts_are_protected_only_when_asked(load_tiny, calibration, tmp_path):
    # frequency saliency does not see output magnitude, so a scaled-up expert
    # that frequency would drop is dropped unless super experts are protected
    plain = _run(load_tiny, calibration, tmp_path, sparsity=0.5, saliency="frequency")
    victim = plain["model.layers.0.mlp"]["removed"][-1]
    dropped = _run(
        load_tiny,
        calibration,
        tmp_path,
        scale_expert=victim,
        sparsity=0.5,
        saliency="frequency",
    )
    assert victim in dropped["model.layers.0.mlp"]["removed"]
    protected = _run(
        load_tiny,
        calibration,
        tmp_path,
        scale_expert=victim,
        sparsity=0.5,
        saliency="frequency",
        preserve_super_experts=True,
    )
    layer0 = protected["model.layers.0.mlp"]
    assert layer0["super_experts"] == [victim] and victim in layer0["kept"]
    # only the first 75% of MoE layers (here: layer 0 of 2) are protected
    assert "super_experts" not in protected["model.layers.1.mlp"]


def test_report_records_scores_frequencies_and_settings(
    load_tiny, calibration, tmp_path
):
    layers = _run(load_tiny, calibration, tmp_path, num_experts=5)
    for entry in layers.values():
        scores = torch.tensor(entry["scores"])
        kept = entry["kept"]
        assert len(kept) == 5 and entry["experts_before"] == 8
        # the removed experts are exactly the three lowest REAP scores
        assert sorted(entry["removed"]) == sorted(scores.argsort()[:3].tolist())
        assert sum(entry["frequency"]) == 2 * entry["calibration_tokens"]
