"""Calibrate once, compress from the saved statistics (issue 17 §1)."""

import json

import pytest
import torch
from llmcompressor import oneshot
from llmcompressor.core import reset_session

from ream_modifiers import (
    DERNModifier,
    ExpertStatisticsModifier,
    REAMModifier,
    REAPModifier,
)
from ream_modifiers.observe.statistics import RoutedExpertSums
from ream_modifiers.observe.stats_file import MANIFEST, StatisticsFile, signature
from tests.conftest import run_modifier

REAM_FAST = {"max_activation_tokens": 64, "verify_merges": False}


def from_statistics(model, modifier) -> dict:
    """One data-free ``oneshot`` of ``modifier`` (no dataset); its report."""
    reset_session()
    oneshot(model=model, recipe=[modifier])
    return json.loads(open(modifier.report_path).read())


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    left, right = a.state_dict(), b.state_dict()
    assert left.keys() == right.keys()
    for name, tensor in left.items():
        assert tensor.shape == right[name].shape, name
        assert torch.equal(tensor, right[name]), name


@pytest.mark.parametrize(
    "cls, settings",
    [(REAPModifier, {}), (REAMModifier, REAM_FAST), (DERNModifier, {})],
    ids=["REAP", "REAM", "DERN"],
)
def test_compressing_from_a_runs_statistics_reproduces_it_bit_for_bit(
    load_tiny, calibration, tmp_path, cls, settings
):
    """A direct run saves what each layer decided on; a second run decides
    from that directory with no forward pass and writes identical weights."""
    stats = tmp_path / "stats"
    model, tokenizer, _ = load_tiny("qwen3_moe")
    direct = cls(
        sparsity=0.5,
        save_statistics=str(stats),
        report_path=str(tmp_path / "direct.json"),
        **settings,
    )
    report = run_modifier(model, tokenizer, calibration("qwen3_moe"), direct)
    assert (stats / MANIFEST).is_file()
    assert StatisticsFile(stats).mode == "sequential"

    again, _, _ = load_tiny("qwen3_moe")
    replay = cls(
        sparsity=0.5,
        from_statistics=str(stats),
        report_path=str(tmp_path / "replay.json"),
        **settings,
    )
    replayed = from_statistics(again, replay)
    assert_same_weights(model, again)
    for name, entry in report["layers"].items():
        other = replayed["layers"][name]
        assert other["kept"] == entry["kept"]
        assert other["scores"] == entry["scores"]
        assert other["calibration_tokens"] == entry["calibration_tokens"] > 0
    assert replayed["statistics_from"]["mode"] == "sequential"


def test_statistics_from_the_original_model_serve_every_method(
    load_tiny, calibration, tmp_path
):
    """``ExpertStatisticsModifier`` leaves the model untouched and records the
    union of what the methods need; each then compresses from it. The first
    layer saw the same hidden states in both, so it decides as a direct run."""
    stats = tmp_path / "original"
    model, tokenizer, _ = load_tiny("qwen3_moe")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    recorder = ExpertStatisticsModifier(
        save_statistics=str(stats),
        methods={"reap": {}, "REAM": REAM_FAST, "DERNModifier": {}},
    )
    run_modifier(model, tokenizer, calibration("qwen3_moe"), recorder)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    recorded = StatisticsFile(stats)
    assert recorded.mode == "original"
    # REAM's gated mean outputs and samples; REAP's routed sums covered by
    # REAM's (with probabilities), not stored twice
    names = [entry["name"] for entry in recorded.manifest["statistics"]]
    assert sorted(names) == ["activations", "logit_gram", "mean_output", "routed"]

    first = "model.layers.0.mlp"
    for cls, settings in [(REAPModifier, {}), (REAMModifier, REAM_FAST)]:
        direct_model, _, _ = load_tiny("qwen3_moe")
        direct = run_modifier(
            direct_model,
            tokenizer,
            calibration("qwen3_moe"),
            cls(sparsity=0.5, report_path=str(tmp_path / "d.json"), **settings),
        )
        model, _, _ = load_tiny("qwen3_moe")
        replay = from_statistics(
            model,
            cls(
                sparsity=0.5,
                from_statistics=str(stats),
                report_path=str(tmp_path / "r.json"),
                **settings,
            ),
        )
        assert replay["layers"][first]["kept"] == direct["layers"][first]["kept"]
        assert replay["layers"][first]["scores"] == direct["layers"][first]["scores"]
        assert replay["statistics_from"]["mode"] == "original"


def test_missing_statistics_are_refused_before_anything_runs(
    load_tiny, calibration, tmp_path
):
    stats = tmp_path / "reap_only"
    model, tokenizer, _ = load_tiny("qwen3_moe")
    run_modifier(
        model,
        tokenizer,
        calibration("qwen3_moe"),
        ExpertStatisticsModifier(save_statistics=str(stats), methods={"reap": {}}),
    )
    model, _, _ = load_tiny("qwen3_moe")
    with pytest.raises(ValueError, match=r"lack \['activations\(.*mean_output"):
        from_statistics(
            model,
            REAMModifier(
                sparsity=0.5,
                from_statistics=str(stats),
                report_path=str(tmp_path / "r.json"),
                **REAM_FAST,
            ),
        )
    # another model's layers
    other, _, _ = load_tiny("mixtral")
    with pytest.raises(ValueError, match="recorded on a qwen3_moe model"):
        from_statistics(
            other,
            REAPModifier(
                sparsity=0.5,
                from_statistics=str(stats),
                report_path=str(tmp_path / "r.json"),
            ),
        )


def test_an_unfinished_or_existing_directory_is_refused(tmp_path):
    partial = tmp_path / "stats.partial"
    partial.mkdir()
    with pytest.raises(ValueError, match="stats.partial exists: that calibration"):
        StatisticsFile(tmp_path / "stats")
    with pytest.raises(ValueError, match="at most one of save_statistics"):
        REAPModifier(sparsity=0.5, save_statistics="a", from_statistics="b")
    with pytest.raises(ValueError, match="give save_statistics"):
        ExpertStatisticsModifier()
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        ExpertStatisticsModifier(save_statistics="x", methods={"nope": {}})


def test_routed_sums_with_probabilities_stand_in_for_plain_ones():
    plain, full = RoutedExpertSums(4), RoutedExpertSums(4, probabilities=True)
    assert plain.accepts(full.name, full.settings())
    assert not full.accepts(plain.name, plain.settings())
    assert signature(full) == "routed(probabilities=True)"
