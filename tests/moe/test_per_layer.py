"""Per-layer expert counts: saved, checked and loaded (issue 17 §2)."""

import json

import pytest
import torch

from ream_modifiers.check import check_checkpoint
from ream_modifiers.moe import find_moe_layers, load_moe_model
from ream_modifiers.moe.per_layer import PER_LAYER_KEY, decoder_index, per_layer_entry
from tests.conftest import sample_input_ids
from tests.per_layer_builder import build_per_layer_checkpoint


def test_a_non_uniform_checkpoint_saves_checks_and_loads(tiny_model_dir, tmp_path):
    out = tmp_path / "per_layer"
    reduced = build_per_layer_checkpoint(tiny_model_dir("qwen3_moe"), out)
    config = json.loads((out / "config.json").read_text())
    assert config[PER_LAYER_KEY] == [8, 4]
    assert config["num_experts"] == 8  # the largest layer's
    report = json.loads((out / "expert_reduction.json").read_text())[-1]
    assert report["budget"] == {
        "signal": "saliency_fraction",
        "kept_per_layer": [8, 4],
    }
    # the quiet experts went, the first layer lost none
    assert report["layers"]["model.layers.1.mlp"]["removed"] == [0, 1, 2, 3]
    assert report["layers"]["model.layers.0.mlp"]["removed"] == []
    check = check_checkpoint(out)
    assert check.ok, check.summary()
    assert "per-layer expert counts [8, 4]" in check.summary()

    # a list that disagrees with the stored experts is caught
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    for file in out.iterdir():
        (wrong / file.name).symlink_to(file)
    (wrong / "config.json").unlink()
    (wrong / "config.json").write_text(json.dumps({**config, PER_LAYER_KEY: [8, 6]}))
    assert check_checkpoint(wrong).codes == ["per-layer-experts-mismatch"]

    loaded = load_moe_model(out, dtype=torch.float32)
    assert [layer.num_experts for layer in find_moe_layers(loaded)] == [8, 4]
    ids = sample_input_ids(vocab=loaded.config.vocab_size)
    with torch.no_grad():
        expected = reduced(input_ids=ids).logits
        assert torch.equal(loaded(input_ids=ids).logits, expected)


def test_per_layer_counts_outside_the_known_families_are_refused(tmp_path):
    # a DeepSeek-V3 config listing per-layer counts: no builder knows it
    from ream_modifiers.tiny import build_tiny_moe

    out = build_tiny_moe("deepseek_v3", tmp_path / "ds")
    config = json.loads((out / "config.json").read_text())
    config[PER_LAYER_KEY] = [None] * config["num_hidden_layers"]
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="builds only for \\['qwen3_moe'\\]"):
        load_moe_model(out, dtype=torch.float32)


def test_the_config_entry_is_indexed_by_decoder_layer():
    layers = [("model.layers.1.mlp", 6), ("model.layers.3.mlp", 4)]
    assert per_layer_entry(layers, 4) == [None, 6, None, 4]
    assert decoder_index("model.language_model.layers.12.mlp") == 12
    assert decoder_index("model.layers.12") == 12
    assert decoder_index("lm_head") is None
    with pytest.raises(ValueError, match="not a decoder layer"):
        per_layer_entry([("model.mtp.layers.0.mlp", 4)], 0)
