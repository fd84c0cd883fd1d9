from ream_modifiers import AIMERModifier
from tests.conftest import run_modifier


def test_report_times_decision_and_apply_per_layer(load_tiny, calibration, tmp_path):
    model, tokenizer, _ = load_tiny("qwen3_moe")
    modifier = AIMERModifier(num_experts=6, report_path=str(tmp_path / "r.json"))
    report = run_modifier(model, tokenizer, calibration("qwen3_moe"), modifier)
    assert list(report["layers"]) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    for entry in report["layers"].values():
        decide, apply = entry["decide_seconds"], entry["apply_seconds"]
        assert decide > 0 and apply >= 0
        # AIMER scores inside decide(), so its scoring time is part of it
        assert decide >= entry["scoring_seconds"] - 1e-4
        assert abs(entry["seconds"] - (decide + apply)) <= 2e-4
