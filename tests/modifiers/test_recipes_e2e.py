"""End to end: oneshot from each YAML recipe, save, reload, compare."""

import json
from pathlib import Path

import pytest
import torch
from llmcompressor import oneshot
from llmcompressor.recipe import Recipe
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from ream_modifiers.check import check_checkpoint
from ream_modifiers.saving import REPORT_FILENAME
from tests.conftest import MODEL_TYPES, NUM_SAMPLES, SEQ_LEN, sample_input_ids

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
# on-disk block and down-projection names per family
DISK_NAMES = {"mixtral": ("block_sparse_moe", "w2")}
COUNT_KEYS = {
    "qwen3_moe": ("num_experts", "num_local_experts"),
    "mixtral": ("num_local_experts",),
    "deepseek_v3": ("n_routed_experts",),
}


def _tensor_names(directory: Path) -> set[str]:
    names = set()
    for file in directory.glob("*.safetensors"):
        with safe_open(file, "pt") as handle:
            names.update(handle.keys())
    return names


@pytest.mark.parametrize(
    "recipe",
    [
        "reap_w4a16.yaml",
        "aimer_w4a16.yaml",
        "ream_w4a16.yaml",
        "dern_w4a16.yaml",
        "moeits_w4a16.yaml",
    ],
)
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_recipe_end_to_end(load_tiny, calibration, tmp_path, model_type, recipe):
    model, tokenizer, _ = load_tiny(model_type)
    oneshot(
        model=model,
        dataset=calibration(model_type),
        recipe=str(RECIPES / recipe),
        processor=tokenizer,
        num_calibration_samples=NUM_SAMPLES,
        max_seq_length=SEQ_LEN,
    )
    ids = sample_input_ids()
    with torch.no_grad():
        in_memory = model(ids).logits
    out = tmp_path / "out"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    assert check_checkpoint(out).violations == []

    reloaded, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(ids).logits, in_memory, rtol=1e-5, atol=1e-5
        )

    config = json.loads((out / "config.json").read_text())
    for key in COUNT_KEYS[model_type]:
        assert config[key] == 6, key
    assert config["num_experts_per_tok"] == 2
    quant = config["quantization_config"]
    names = _tensor_names(out)
    block, down = DISK_NAMES.get(model_type, ("mlp", "down_proj"))
    moe_layers = sorted({n.split(f".{block}.")[0] for n in names if ".experts." in n})
    assert len(moe_layers) == 2
    for layer in moe_layers:
        # every expert of the new count is present, packed, and none beyond it
        for e in range(6):
            assert f"{layer}.{block}.experts.{e}.{down}.weight_packed" in names
        assert not any(n.startswith(f"{layer}.{block}.experts.6.") for n in names)
        # the router stays unquantized and is listed in the ignore list
        assert f"{layer}.{block}.gate.weight" in names
        assert f"{layer}.{block}.gate" in quant["ignore"]
        assert not any(n.startswith(f"{layer}.{block}.gate.weight_") for n in names)
    for layer in reloaded.model.layers:
        experts = getattr(layer.mlp, "experts", None)
        if experts is not None:
            assert experts.gate_up_proj.shape[0] == 6
            assert layer.mlp.gate.weight.shape[0] == 6

    report = json.loads((out / REPORT_FILENAME).read_text())
    assert report[0]["method"] in ("REAP", "AIMER", "REAM", "DERN", "MoEITS")
    assert all(len(entry["kept"]) == 6 for entry in report[0]["layers"].values())
    recipe_yaml = (out / "recipe.yaml").read_text()
    reparsed = Recipe.create_instance(recipe_yaml)
    assert type(reparsed.modifiers[0]).__name__ == report[0]["method"] + "Modifier"


def test_deepseek_correction_bias_follows_kept_experts(
    load_tiny, calibration, tmp_path
):
    model, tokenizer, _ = load_tiny("deepseek_v3")
    bias = model.model.layers[1].mlp.gate.e_score_correction_bias.clone()
    report = tmp_path / "r.json"
    oneshot(
        model=model,
        dataset=calibration("deepseek_v3"),
        recipe=f"""
aimer_stage:
  aimer_modifiers:
    AIMERModifier: {{sparsity: 0.5, report_path: "{report}"}}
""",
        processor=tokenizer,
    )
    kept = json.loads(report.read_text())["layers"]["model.layers.1.mlp"]["kept"]
    assert len(kept) == 4 and sum(k < 4 for k in kept) == 2  # two per group
    assert torch.equal(
        model.model.layers[1].mlp.gate.e_score_correction_bias, bias[kept]
    )


def test_shared_expert_gate_stays_unquantized(load_tiny, calibration, tmp_path):
    """qwen2_moe's shared_expert_gate is an nn.Linear GPTQ would otherwise take."""
    model, tokenizer, _ = load_tiny("qwen2_moe")
    gate = model.model.layers[0].mlp.shared_expert_gate.weight.clone()
    oneshot(
        model=model,
        dataset=calibration("qwen2_moe"),
        recipe=str(RECIPES / "reap_w4a16.yaml"),
        processor=tokenizer,
        num_calibration_samples=NUM_SAMPLES,
        max_seq_length=SEQ_LEN,
    )
    out = tmp_path / "out"
    model.save_pretrained(out)
    assert check_checkpoint(out).violations == []
    names = _tensor_names(out)
    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    for layer in ("model.layers.0", "model.layers.1"):
        assert f"{layer}.mlp.shared_expert_gate" in quant["ignore"]
        assert f"{layer}.mlp.shared_expert_gate.weight" in names
        assert f"{layer}.mlp.shared_expert.down_proj.weight_packed" in names
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    # the shared-expert gate is saved exactly as it was
    torch.testing.assert_close(
        reloaded.model.layers[0].mlp.shared_expert_gate.weight, gate, rtol=0, atol=0
    )


def test_ream_fp8_dynamic_recipe(load_tiny, calibration, tmp_path):
    model, tokenizer, _ = load_tiny("qwen3_moe")
    oneshot(
        model=model,
        dataset=calibration("qwen3_moe"),
        recipe=str(RECIPES / "ream_fp8_dynamic.yaml"),
        processor=tokenizer,
        num_calibration_samples=NUM_SAMPLES,
        max_seq_length=SEQ_LEN,
    )
    out = tmp_path / "out"
    model.save_pretrained(out)
    report = check_checkpoint(out)
    assert report.violations == []
    assert report.quantization_format == "float-quantized"
    config = json.loads((out / "config.json").read_text())
    assert config["num_experts"] == 6
    weights = config["quantization_config"]["config_groups"]["group_0"]["weights"]
    assert weights["type"] == "float" and weights["num_bits"] == 8
    names = _tensor_names(out)
    assert "model.layers.0.mlp.experts.5.down_proj.weight_scale" in names
    assert "model.layers.0.mlp.experts.6.down_proj.weight" not in names
    assert "model.layers.0.mlp.gate" in config["quantization_config"]["ignore"]
