"""
Qwen3-Omni (the whole model: thinker, talker, code2wav): the model gets the
thinker's forward (ream_modifiers/moe/forward_module.py), only the thinker's
experts are reduced, and everything else is saved as it was: the talker's own
MoE, the code-to-waveform decoder, the audio and vision towers.
"""

from __future__ import annotations

import json

import pytest
import torch
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier
from safetensors.torch import load_file
from transformers import AutoConfig

from ream_modifiers.check import check_checkpoint
from ream_modifiers.modifiers import REAPModifier
from ream_modifiers.moe import find_moe_layers
from ream_modifiers.moe.architectures import (
    UNSUPPORTED_FAMILIES,
    UnsupportedFamilyError,
    get_arch_spec,
    text_config,
)
from ream_modifiers.moe.forward_module import adapt_forward_module
from tests.conftest import NUM_SAMPLES, SEQ_LEN, sample_input_ids

FAMILY = "qwen3_omni_moe"
# what vLLM does not serve, or serves unreduced: kept exactly
KEPT_PREFIXES = ("talker.", "code2wav.", "thinker.audio_tower.", "thinker.visual.")


def test_the_whole_model_runs_the_thinker(load_tiny):
    model, _, _ = load_tiny(FAMILY)
    assert type(model).__name__ == "Qwen3OmniMoeForConditionalGeneration"
    ids = sample_input_ids(batch=2, length=12)
    with torch.no_grad():
        whole = model(ids).logits
        thinker = model.thinker(input_ids=ids).logits
    torch.testing.assert_close(whole, thinker, rtol=0, atol=0)
    assert model.get_input_embeddings() is model.thinker.get_input_embeddings()
    adapt_forward_module(model)  # idempotent
    assert type(model).__mro__[1].__name__ == "Qwen3OmniMoeForConditionalGeneration"


def test_only_the_thinkers_experts_are_moe_layers(load_tiny):
    model, _, _ = load_tiny(FAMILY)
    assert [layer.name for layer in find_moe_layers(model)] == [
        "thinker.model.layers.0.mlp",
        "thinker.model.layers.1.mlp",
    ]
    # the talker's blocks are linearized too (llm-compressor does all), but
    # with their own count
    assert model.talker.model.layers[0].mlp.experts.num_experts == 4
    assert text_config(model.config).num_experts == 8


def _reduce(load_tiny, calibration, out, quantized: bool):
    model, tokenizer, source = load_tiny(FAMILY)
    recipe = [REAPModifier(sparsity=0.25)]
    if quantized:
        recipe.append(
            GPTQModifier(targets=["Linear"], scheme="W4A16", ignore=["lm_head"])
        )
    oneshot(
        model=model,
        dataset=calibration(FAMILY, num_samples=NUM_SAMPLES),
        recipe=recipe,
        processor=tokenizer,
        num_calibration_samples=NUM_SAMPLES,
        max_seq_length=SEQ_LEN,
    )
    model.save_pretrained(out)
    return load_file(source / "model.safetensors"), load_file(out / "model.safetensors")


def test_reduction_keeps_the_talker_code2wav_and_towers_bit_identical(
    load_tiny, calibration, tmp_path
):
    source, saved = _reduce(load_tiny, calibration, tmp_path, quantized=False)
    kept = {name for name in source if name.startswith(KEPT_PREFIXES)}
    assert any(name.startswith("talker.model.layers.0.mlp.experts.3.") for name in kept)
    for name in kept:  # the talker's experts per expert, as on the hub
        assert torch.equal(saved[name], source[name]), name
    assert not any(k.startswith("thinker.model.layers.0.mlp.experts.6.") for k in saved)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["thinker_config"]["text_config"]["num_experts"] == 6
    assert config["talker_config"]["text_config"]["num_local_experts"] == 4
    assert config["architectures"] == ["Qwen3OmniMoeForConditionalGeneration"]
    check = check_checkpoint(tmp_path)
    assert check.violations == [], check.summary()
    assert sorted(check.experts_per_layer) == [
        "thinker.model.layers.0.mlp",
        "thinker.model.layers.1.mlp",
    ]


def test_a_quantized_output_stores_the_unquantized_talker_experts_fused(
    load_tiny, calibration, tmp_path
):
    """transformers reloads unquantized experts of a quantized checkpoint only in
    its fused layout (it reads every per-expert name as packed)."""
    source, saved = _reduce(load_tiny, calibration, tmp_path, quantized=True)
    prefix = "talker.model.layers.1.mlp.experts"
    gate_up = torch.stack(
        [
            torch.cat(
                [
                    source[f"{prefix}.{e}.gate_proj.weight"],
                    source[f"{prefix}.{e}.up_proj.weight"],
                ]
            )
            for e in range(4)
        ]
    )
    down = torch.stack([source[f"{prefix}.{e}.down_proj.weight"] for e in range(4)])
    assert torch.equal(saved[f"{prefix}.gate_up_proj"], gate_up)
    assert torch.equal(saved[f"{prefix}.down_proj"], down)
    assert not any(k.startswith(f"{prefix}.0.") for k in saved)
    assert "thinker.model.layers.1.mlp.experts.5.down_proj.weight_packed" in saved
    for name in source:
        if name.startswith(KEPT_PREFIXES) and ".mlp.experts." not in name:
            assert torch.equal(saved[name], source[name]), name
    packed = {k.split(".")[0] for k in saved if k.endswith("weight_packed")}
    assert packed == {"thinker"}
    assert not any(".audio_tower." in k and k.endswith("_packed") for k in saved)


def test_a_thinker_alone_is_refused_with_what_to_reduce_instead():
    config = AutoConfig.for_model("qwen3_omni_moe_thinker")
    with pytest.raises(UnsupportedFamilyError, match="whole Qwen3-Omni checkpoint"):
        get_arch_spec(config)
    assert "qwen3_omni_moe" not in UNSUPPORTED_FAMILIES
