"""Padding a per-layer-count checkpoint to one count (issue 17 §2 (a))."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from ream_modifiers.disk_pad import NEVER, pad_on_disk
from ream_modifiers.disk_prune import DiskPruneError
from ream_modifiers.moe.per_layer import PER_LAYER_KEY
from tests.conftest import sample_input_ids
from tests.per_layer_builder import build_per_layer_checkpoint


def test_padded_deepseek_loads_in_stock_transformers_and_computes_the_same(
    tiny_model_dir, tmp_path
):
    """DeepSeek-V3 (no per-layer builder): the MoE layers keep 8 and 4 experts,
    padded back to 8 with zero experts whose selection bias never wins; stock
    transformers loads it and its logits equal the reduced model's."""
    per_layer = tmp_path / "per_layer"
    reduced = build_per_layer_checkpoint(
        tiny_model_dir("deepseek_v3"), per_layer, family="deepseek_v3"
    )
    assert json.loads((per_layer / "config.json").read_text())[PER_LAYER_KEY] == [
        None, 8, 4
    ]  # fmt: skip
    check = pad_on_disk(per_layer, tmp_path / "padded")
    assert check.ok and check.experts_per_layer == {
        "model.layers.1.mlp": 8,
        "model.layers.2.mlp": 8,
    }
    config = json.loads((tmp_path / "padded" / "config.json").read_text())
    assert PER_LAYER_KEY not in config and config["n_routed_experts"] == 8
    padded = AutoModelForCausalLM.from_pretrained(tmp_path / "padded").eval()
    bias = padded.model.layers[2].mlp.gate.e_score_correction_bias
    # two real experts, then two pads, in each of the two router groups
    assert bias[[2, 3, 6, 7]].eq(NEVER).all() and bias[[0, 1, 4, 5]].gt(NEVER).all()
    ids = sample_input_ids(vocab=padded.config.vocab_size)
    with torch.no_grad():
        expected = reduced.eval()(input_ids=ids).logits
        torch.testing.assert_close(padded(input_ids=ids).logits, expected)
    report = json.loads((tmp_path / "padded" / "expert_reduction.json").read_text())
    assert report[-1]["padded_experts_per_layer"] == [None, 0, 4]
    assert "none over the largest layer" in report[-1]["memory_saved"]


def test_a_router_without_a_bias_cannot_be_padded(tiny_model_dir, tmp_path, capsys):
    from tests.helpers import refused

    per_layer = tmp_path / "per_layer"
    build_per_layer_checkpoint(tiny_model_dir("qwen3_moe"), per_layer)
    argv = ["pad", "--model", str(per_layer), "--output", str(tmp_path / "padded")]
    problem = refused(capsys, argv)
    assert "no router row for a padded expert loses on every input" in problem.error
    assert "selection or logit bias" in problem.fix
    with pytest.raises(DiskPruneError, match="nothing to pad"):
        pad_on_disk(tiny_model_dir("qwen3_moe"), tmp_path / "other")
    assert not (tmp_path / "padded").exists()
