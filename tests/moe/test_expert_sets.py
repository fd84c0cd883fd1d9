"""
ERNIE-4.5-VL's two expert sets per MoE layer (ream_modifiers/moe/expert_sets.py):
each set linearized at its own width, a set that text rows cannot reach pruned
by the documented weight-only rule, both sets saved back into the hub's one
list per layer, and the checker reading that list as two sets.
"""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText

from ream_modifiers.check import check_checkpoint
from ream_modifiers.check.layout import find_blocks, split_expert_sets
from ream_modifiers.engines.selection import ExpertBudget, select_kept
from ream_modifiers.modifiers import REAPModifier
from ream_modifiers.modifiers.aimer.score import aimer_score_experts
from ream_modifiers.modifiers.base import WEIGHT_ONLY_RULE
from ream_modifiers.moe import find_moe_layers
from ream_modifiers.moe.architectures import ARCHITECTURES
from tests.check.editing import drop, edited
from tests.conftest import run_modifier, sample_input_ids

FAMILY = "ernie4_5_vl_moe"
SPEC = ARCHITECTURES[FAMILY]
LAYER = "model.language_model.layers.1.mlp"


def test_each_set_is_linearized_at_its_width_with_the_models_logits(
    tiny_model_dir, load_tiny
):
    model, _, path = load_tiny(FAMILY)
    layers = {layer.name: layer for layer in find_moe_layers(model)}
    assert sorted(layers) == [
        "model.language_model.layers.1.mlp.text_moe",
        "model.language_model.layers.1.mlp.vision_moe",
        "model.language_model.layers.2.mlp.text_moe",
        "model.language_model.layers.2.mlp.vision_moe",
    ]
    assert layers[f"{LAYER}.text_moe"].expert(0).up_proj.out_features == 256
    assert layers[f"{LAYER}.vision_moe"].expert(0).up_proj.out_features == 128
    assert layers[f"{LAYER}.vision_moe"].owner is model.get_submodule(LAYER)
    fused = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    ids = sample_input_ids(batch=2, length=12)
    with torch.no_grad():
        torch.testing.assert_close(
            model(ids).logits, fused(ids).logits, rtol=1e-5, atol=1e-5
        )


def _vision_experts(state: dict, layer: int, indices) -> list[list[torch.Tensor]]:
    """A layer's vision experts in the hub list (after the text ones)."""
    prefix = f"model.layers.{layer}.mlp.experts"
    return [
        [
            state[f"{prefix}.{i}.{p}.weight"]
            for p in ("gate_proj", "up_proj", "down_proj")
        ]
        for i in indices
    ]


def test_text_rows_reduce_the_vision_set_by_the_weight_only_rule_and_save_the_hub_list(
    tiny_model_dir, load_tiny, calibration, tmp_path
):
    model, tokenizer, path = load_tiny(FAMILY)
    modifier = REAPModifier(sparsity=0.25, report_path=str(tmp_path / "r.json"))
    report = run_modifier(model, tokenizer, calibration(FAMILY), modifier)
    source = load_file(path / "model.safetensors")
    vision = report["layers"][f"{LAYER}.vision_moe"]
    text = report["layers"][f"{LAYER}.text_moe"]
    # the vision set: AIMER's choice on its own weights, highest removed
    scores = aimer_score_experts(_vision_experts(source, 1, range(8, 16)))
    budget = ExpertBudget(num_experts=8, kept=6)
    assert vision["rule"] == WEIGHT_ONLY_RULE
    assert vision["kept"] == select_kept(scores, budget, remove="highest")
    assert "rule" not in text and text["calibration_tokens"] > 0
    # the parent MLP routes by the new count: image tokens take the vision set
    mlp = model.get_submodule(LAYER)
    assert mlp.num_experts == 6
    hidden = torch.randn(1, 5, 128)
    kinds = torch.tensor([[0, 1, 1, 0, 1]])
    with torch.no_grad():
        out, logits = mlp(hidden, moe_mm_token_type_ids=kinds)
    assert out.shape == hidden.shape and logits.shape == (5, 6)

    out_dir = tmp_path / "out"
    model.save_pretrained(out_dir)
    saved = load_file(out_dir / "model.safetensors")
    prefix = "model.layers.1.mlp"
    for new, old in enumerate(text["kept"]):  # text first, then vision
        for proj in ("gate_proj", "up_proj", "down_proj"):
            assert torch.equal(
                saved[f"{prefix}.experts.{new}.{proj}.weight"],
                source[f"{prefix}.experts.{old}.{proj}.weight"],
            )
    for new, old in enumerate(vision["kept"]):
        assert torch.equal(
            saved[f"{prefix}.experts.{6 + new}.down_proj.weight"],
            source[f"{prefix}.experts.{8 + old}.down_proj.weight"],
        )
    assert not any(k.startswith(f"{prefix}.experts.12.") for k in saved)
    assert torch.equal(
        saved[f"{prefix}.gate.weight_1"],
        source[f"{prefix}.gate.weight_1"][:, vision["kept"]],
    )
    bias = source[f"{prefix}.moe_statics.e_score_correction_bias"]
    assert torch.equal(
        saved[f"{prefix}.moe_statics.e_score_correction_bias"],
        torch.stack([bias[0, text["kept"]], bias[1, vision["kept"]]]),
    )
    # the tower under the hub's top-level name, which vLLM's mapper reads as
    # the tower (transformers' own save writes model.vision_model)
    tower = {k: v for k, v in source.items() if k.startswith("vision_model.")}
    assert len(tower) > 20 and not any(
        k.startswith("model.vision_model.") for k in saved
    )
    for name, tensor in tower.items():
        assert torch.equal(saved[name], tensor), name
    config = json.loads((out_dir / "config.json").read_text())
    assert config["moe_num_experts"] == [6, 6]  # what vLLM reads
    assert config["text_config"]["moe_num_experts"] == 6

    check = check_checkpoint(out_dir)
    assert check.violations == [], check.summary()
    assert check.experts_per_layer == {
        f"model.layers.{i}.mlp.{s}": 6 for i in (1, 2) for s in SPEC.expert_sets
    }
    # one vision expert lost: the set no longer matches the text set
    broken = edited(out_dir, tmp_path / "b", tensors=drop(f"{prefix}.experts.11."))
    assert "non-uniform-experts" in check_checkpoint(broken).codes


def test_the_stored_list_splits_into_sets_of_their_own_shapes(tiny_model_dir):
    from ream_modifiers.check.layout import read_shapes
    from ream_modifiers.check.report import CheckReport

    directory = tiny_model_dir(FAMILY)
    shapes = read_shapes(directory, CheckReport(directory))
    blocks, _ = find_blocks(shapes, SPEC)
    assert blocks["model.layers.1.mlp"].count == 16
    split = split_expert_sets(blocks, SPEC)
    text, vision = (
        split["model.layers.1.mlp.text_moe"],
        split["model.layers.1.mlp.vision_moe"],
    )
    assert (text.count, vision.count) == (8, 8)
    assert vision.experts[0]["down_proj"]["weight"].disk == (
        "model.layers.1.mlp.experts.8.down_proj.weight"
    )
    assert vision.router["weight"].shape == (8, 128)  # stored [H, E]
    assert vision.bias.shape == (1, 8)
