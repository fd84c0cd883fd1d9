import pytest

from ream_modifiers import AIMERModifier, REAMModifier
from ream_modifiers.modifiers.base import ExpertReductionModifier
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


def test_every_rank_reads_before_any_writes(load_tiny, calibration, monkeypatch):
    """The base class runs read(), the barrier across ranks, then write(): a
    method cannot write before the barrier, nor skip it."""
    events = []

    class Recorder(REAMModifier):
        def read(self, layer, decision):
            events.append("read")
            return super().read(layer, decision)

        def write(self, layer, decision, read):
            events.append("write")
            super().write(layer, decision, read)

    monkeypatch.setattr(
        ExpertReductionModifier, "_sync_ranks", lambda self: events.append("sync")
    )
    model, tokenizer, _ = load_tiny("qwen3_moe")
    modifier = Recorder(num_experts=4, verify_merges=False, max_activation_tokens=64)
    run_modifier(model, tokenizer, calibration("qwen3_moe"), modifier)
    # per layer: read, barrier, write, then the barrier before the next layer runs
    assert events == ["read", "sync", "write", "sync"] * 2


def test_a_modifier_that_overrides_apply_is_refused():
    with pytest.raises(TypeError, match="overrides apply\\(\\); override read\\(\\)"):

        class Unsafe(AIMERModifier):
            def apply(self, layer, decision):
                pass


def test_statistics_are_a_typed_object_decide_reads_by_name():
    """The fields a method declares are what is collected, in order."""
    from ream_modifiers.modifiers.merging import MergingStatistics
    from ream_modifiers.observe.statistics import MeanExpertOutput, RoutedExpertSums

    stats = MergingStatistics(RoutedExpertSums(8), MeanExpertOutput(8))
    assert stats.collected() == [stats.routed, stats.mean_output]
    assert stats.logit_gram is None
