import json

import pytest
import torch
from pydantic import ValidationError
from transformers import AutoModelForCausalLM

from ream_modifiers import DERNModifier, MoEITSModifier, REAPModifier
from ream_modifiers.moe import find_moe_layers
from tests.conftest import copy_expert, run_modifier, sample_input_ids


def test_dern_with_tau_one_equals_pruning_by_importance(
    load_tiny, calibration, tmp_path
):
    model, tokenizer, _ = load_tiny("qwen3_moe")
    dern = run_modifier(
        model,
        tokenizer,
        calibration("qwen3_moe"),
        DERNModifier(
            sparsity=0.5, similarity_threshold=1.0, report_path=str(tmp_path / "d.json")
        ),
    )
    other, tokenizer, _ = load_tiny("qwen3_moe")
    reap = run_modifier(
        other,
        tokenizer,
        calibration("qwen3_moe"),
        REAPModifier(
            sparsity=0.5,
            saliency="weighted_frequency",
            report_path=str(tmp_path / "r.json"),
        ),
    )
    for name, entry in dern["layers"].items():
        assert entry["kept"] == reap["layers"][name]["kept"]
        assert set(entry["segments_received"].values()) == {0}
    ids = sample_input_ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, other(ids).logits)


def test_dern_moves_every_segment_with_tau_minus_one(load_tiny, calibration, tmp_path):
    model, tokenizer, _ = load_tiny("deepseek_v3")
    before = find_moe_layers(model)[0].router_weight.detach().clone()
    report = run_modifier(
        model,
        tokenizer,
        calibration("deepseek_v3"),
        DERNModifier(
            sparsity=0.5,
            similarity_threshold=-1.0,
            kmeans_iters=5,
            report_path=str(tmp_path / "d.json"),
        ),
    )
    entry = report["layers"]["model.layers.1.mlp"]
    assert sum(entry["segments_received"].values()) == 4 * 128
    for target, shares in entry["router_shares"].items():
        # segments never cross router groups of 4
        assert all(int(o) // 4 == int(target) // 4 for o in shares)
    layer = find_moe_layers(model)[0]
    assert layer.num_experts == 4 and layer.expert(0).down_proj.weight.shape == (
        128,
        128,
    )
    kept = entry["kept"]
    expected = before[kept].clone()
    for i, target in enumerate(kept):
        for source, share in entry["router_shares"][str(target)].items():
            expected[i] += share * before[int(source)]
    torch.testing.assert_close(layer.router_weight, expected)


def test_moeits_removes_a_duplicated_expert_first(load_tiny, tmp_path):
    model, tokenizer, _ = load_tiny("mixtral")
    layer = find_moe_layers(model)[0]
    copy_expert(layer, 2, 5)
    report = run_modifier(
        model,
        tokenizer,
        None,
        MoEITSModifier(num_experts=7, report_path=str(tmp_path / "m.json")),
    )
    removed = report["layers"]["model.layers.0.mlp"]["removed"]
    assert len(removed) == 1 and removed[0] in (2, 5)
    assert {len(e["kept"]) for e in report["layers"].values()} == {7}


def test_moeits_adaptive_mode_warns_and_records_per_layer_counts(load_tiny, tmp_path):
    model, tokenizer, _ = load_tiny("qwen3_moe")
    layer = find_moe_layers(model)[0]
    for copy in (3, 6):
        copy_expert(layer, 0, copy)
    report = run_modifier(
        model,
        tokenizer,
        None,
        MoEITSModifier(
            allow_nonuniform=True, lambda_iqr=1.0, report_path=str(tmp_path / "m.json")
        ),
    )
    counts = [len(e["kept"]) for e in report["layers"].values()]
    first = report["layers"]["model.layers.0.mlp"]
    assert len({0, 3, 6} & set(first["kept"])) == 1  # two of the three copies go
    assert all(c >= 2 for c in counts)
    if len(set(counts)) > 1:
        assert report["num_experts_after"] == counts
        model.save_pretrained(tmp_path / "out")
        config = json.loads((tmp_path / "out" / "config.json").read_text())
        # one entry per decoder layer (both are MoE layers here)
        assert config["num_experts_per_layer"] == counts


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(sparsity=0.25, similarity_threshold=1.5), "cosine in \\[-1, 1\\]"),
        (dict(sparsity=0.25, similarity_features=["up", "up"]), "distinct parts"),
        (dict(sparsity=0.25, similarity_features=["bias"]), "similarity_features"),
    ],
)
def test_dern_field_errors(kwargs, message):
    with pytest.raises(ValidationError, match=message):
        DERNModifier(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(sparsity=0.25, bins=1), "bins must be >= 2"),
        (dict(sparsity=0.25, projection_weights={"w9": 1.0}), "maps gate / up / down"),
        (dict(allow_nonuniform=True, sparsity=0.25), "give neither num_experts"),
        (dict(), "exactly one of `num_experts`"),
    ],
)
def test_moeits_field_errors(kwargs, message):
    with pytest.raises(ValidationError, match=message):
        MoEITSModifier(**kwargs)


def test_reload_after_dern_with_transfers(load_tiny, calibration, tmp_path):
    model, tokenizer, _ = load_tiny("qwen3_moe")
    run_modifier(
        model,
        tokenizer,
        calibration("qwen3_moe"),
        DERNModifier(
            sparsity=0.25,
            similarity_threshold=-1.0,
            kmeans_iters=3,
            report_path=str(tmp_path / "d.json"),
        ),
    )
    ids = sample_input_ids()
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, expected, rtol=1e-5, atol=1e-5)
