"""
The architecture matrix: every modifier, with and without GPTQ W4A16, on a tiny
random model of every supported family. Each cell runs ``oneshot``, saves,
reloads with transformers and checks what vLLM relies on.

The default run takes a fast slice (every family with REAP + W4A16, every
method on Qwen3-MoE and on gpt-oss); ``REAM_FULL_MATRIX=1`` runs the whole
product. See README.md for timings.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier
from safetensors import safe_open
from transformers import AutoConfig

from ream_modifiers.check import check_checkpoint
from ream_modifiers.moe import MoEModelError, find_moe_layers
from ream_modifiers.moe.architectures import (
    ARCHITECTURES,
    MoEArchSpec,
    text_config,
    text_config_entry,
)
from ream_modifiers.moe.auto import auto_model_class
from ream_modifiers.moe.conversions import per_expert_checkpoints
from ream_modifiers.moe.forward_module import adapt_forward_module
from ream_modifiers.registry import methods
from ream_modifiers.saving import REPORT_FILENAME
from ream_modifiers.tiny import TINY_CONFIGS
from tests.conftest import NUM_SAMPLES, SEQ_LEN, sample_input_ids

FAMILIES = [
    "qwen3_moe",
    "qwen2_moe",
    "mixtral",
    "olmoe",
    "deepseek_v2",
    "deepseek_v3",
    "glm4_moe",
    "qwen3_next",
    "ernie4_5_moe",
    "minimax_m2",
    "dots1",
    "hunyuan_v1_moe",
    "gpt_oss",
    "deepseek_v32",
    "glm_moe_dsa",
    "glm4_moe_lite",
    "flex_olmo",
    "jamba",
    "afmoe",
    "qwen3_5_moe_text",
    "hy_v3",
    "lfm2_moe",
    "nemotron_h",
    "granitemoe",
    "granitemoeshared",
    "granitemoehybrid",
    "qwen3_vl_moe",
    "qwen3_5_moe",
    "glm4v_moe",
    "phimoe",
    "kimi_linear",
    "kimi_k25",
    "solar_open",
    "exaone_moe",
    "mellum",
    "cohere2_moe",
    "llama4_text",
    "llama4",
    "qwen3_omni_moe",
    "ernie4_5_vl_moe",
]
# every registered method at 25%, with its quick settings for tiny models
MODIFIERS = {
    method.name: (
        lambda method=method: method.modifier(sparsity=0.25, **method.fast_settings)
    )
    for method in methods()
}
# (family, modifier): why that method cannot run on that family at all
UNSUPPORTED = {
    ("gpt_oss", "dern"): "biases",
}
KEPT = 6  # 8 experts, sparsity 0.25
FULL = os.environ.get("REAM_FULL_MATRIX", "") not in ("", "0")
# every config key that stores an expert count in some family
COUNT_KEYS = {
    "num_experts",
    "num_local_experts",
    "n_routed_experts",
    "moe_num_experts",
}


def _fast(family: str, method: str, quantized: bool) -> bool:
    return (
        (method == "reap" and quantized)
        or (family == "qwen3_moe" and not quantized)
        or (family == "gpt_oss" and not quantized)
    )


def _cells():
    for family in FAMILIES:
        for method in MODIFIERS:
            if (family, method) in UNSUPPORTED:
                continue
            for quantized in (False, True):
                if not (FULL or _fast(family, method, quantized)):
                    continue
                name = f"{family}-{method}-{'w4a16' if quantized else 'plain'}"
                yield pytest.param(family, method, quantized, id=name)


def _tensors(directory: Path) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for file in directory.glob("*.safetensors"):
        with safe_open(file, "pt") as handle:
            for key in handle.keys():
                shapes[key] = tuple(handle.get_slice(key).get_shape())
    return shapes


def _hub_block(spec: MoEArchSpec) -> str:
    return spec.hub_block_attr or "mlp"


def _check_expert_tensors(spec, layers, shapes, quantized):
    """Every kept expert under its hub name, nothing beyond the new count."""
    block = _hub_block(spec)
    stored = KEPT * spec.sets_per_layer
    for layer in layers:
        prefix = f"{layer}.{block}.experts"
        if spec.fused_on_disk and not quantized:
            # the hub layout (gpt-oss, Llama-4): one fused tensor per
            # projection (and bias)
            for name in spec.fused_experts:
                assert shapes[f"{prefix}.{name}"][0] == KEPT, name
            assert not any(k.startswith(f"{prefix}.0.") for k in shapes)
            continue
        suffix = "weight_packed" if quantized else "weight"
        for e in range(stored):
            if spec.packed_expert_names and quantized:
                # gpt-oss: the fused per-expert names vLLM reads, with biases
                for packed in spec.packed_expert_names:
                    for param in ("weight_packed", "weight_scale", "bias"):
                        assert f"{prefix}.{e}.{packed}_{param}" in shapes
                assert not any(k.startswith(f"{prefix}.{e}.gate_proj") for k in shapes)
                continue
            for proj in spec.hub_projections:
                assert f"{prefix}.{e}.{proj}.{suffix}" in shapes, (e, proj)
        assert not any(k.startswith(f"{prefix}.{stored}.") for k in shapes)


def _check_routers(spec, layers, shapes, quant):
    block = _hub_block(spec)
    ignored = set(quant["ignore"]) if quant else set()
    # Hunyuan-3 stores the router under another name (mlp.router.gate)
    on_disk = {spec.memory_name(name): name for name in shapes}
    for layer in layers:
        named = spec.memory_name(f"{layer}.{block}.{spec.router_attr}.weight")
        router = on_disk[named].removesuffix(".weight")
        if spec.expert_sets:
            # one gate per set, stored [H, E]: weight, weight_1, ...
            for offset, name in enumerate(spec.expert_sets):
                suffix = f"_{offset}" if offset else ""
                assert shapes[f"{router}.weight{suffix}"][1] == KEPT
                assert (
                    quant is None or f"{layer}.{block}.{name}.gate" in quant["ignore"]
                )
            continue
        assert shapes[f"{router}.weight"][0] == KEPT
        assert not any(k.startswith(f"{router}.weight_") for k in shapes)
        gate = spec.shared_expert_gate_attr
        if gate:
            assert f"{layer}.{block}.{gate}.weight" in shapes
            assert not any(
                k.startswith(f"{layer}.{block}.{gate}.weight_") for k in shapes
            )
        if quant is None:
            continue
        memory = named.removesuffix(".weight")
        assert router in ignored or memory in ignored, (router, sorted(ignored))
        if gate:
            assert f"{layer}.mlp.{gate}" in ignored


def _check_config(spec, config):
    if spec.hub_architectures:  # the name vLLM's registry knows (PhiMoE)
        assert config["architectures"] == list(spec.hub_architectures)
    config, _ = text_config_entry(config)  # a wrapper's language model
    for key in spec.num_experts_keys:
        assert config[key] == KEPT, key
    for key in COUNT_KEYS & set(config):
        assert config[key] == KEPT, key
    if spec.model_type == "qwen3_moe":
        assert config["num_experts"] == KEPT
    if spec.model_type == "deepseek_v3":
        # vLLM creates the correction bias only for noaux_tc, and defaults to
        # softmax without scoring_func
        assert config["topk_method"] == "noaux_tc"
        assert config["scoring_func"] == "sigmoid"
        assert config["n_group"] == 2


def _reload(path: Path, family: str):
    config = AutoConfig.from_pretrained(path)
    count = getattr(text_config(config), ARCHITECTURES[family].num_experts_key)
    with per_expert_checkpoints(family, count):
        model, info = auto_model_class(config).from_pretrained(
            path, output_loading_info=True
        )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    adapt_forward_module(model)  # Qwen3-Omni's whole model has no forward
    return model


@pytest.mark.parametrize("family, method, quantized", list(_cells()))
def test_matrix_cell(load_tiny, calibration, tmp_path, family, method, quantized):
    spec = ARCHITECTURES[family]
    model, tokenizer, _ = load_tiny(family)
    recipe = [MODIFIERS[method]()]
    if quantized:
        recipe.append(
            GPTQModifier(targets=["Linear"], scheme="W4A16", ignore=["lm_head"])
        )
    oneshot(
        model=model,
        dataset=calibration(family, num_samples=8),
        recipe=recipe,
        processor=tokenizer,
        num_calibration_samples=8,
        max_seq_length=SEQ_LEN,
    )
    assert {layer.num_experts for layer in find_moe_layers(model)} == {KEPT}
    ids = sample_input_ids()
    with torch.no_grad():
        in_memory = model(ids).logits
    out = tmp_path / "out"
    model.save_pretrained(out)

    reloaded = _reload(out, family)
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(ids).logits, in_memory, rtol=1e-5, atol=1e-5
        )

    shapes = _tensors(out)
    block = _hub_block(spec)
    layers = sorted(
        {
            k.split(f".{block}.experts")[0]
            for k in shapes
            if ".experts" in k and spec.in_scope(k)
        }
    )
    assert len(layers) == 2
    config = json.loads((out / "config.json").read_text())
    quant = config.get("quantization_config")
    assert (quant is not None) == quantized
    _check_expert_tensors(spec, layers, shapes, quantized)
    _check_routers(spec, layers, shapes, quant)
    # vLLM builds the output head unquantized (a wrapper's is nested:
    # Llama-4's language_model.lm_head, which the recipe's `lm_head` misses)
    assert not any("lm_head.weight_" in name for name in shapes)
    _check_config(spec, config)
    report = json.loads((out / REPORT_FILENAME).read_text())[0]
    moe_layers = 2 * spec.sets_per_layer  # each set is an MoE layer
    assert [len(e["kept"]) for e in report["layers"].values()] == [KEPT] * moe_layers
    check = check_checkpoint(out)
    assert check.violations == [], check.summary()
    assert sorted(check.experts_per_layer.values()) == [KEPT] * moe_layers
    assert check.quantization_format == (quant["format"] if quant else None)


@pytest.mark.parametrize("family, method", sorted(UNSUPPORTED))
def test_unsupported_cell_fails_before_calibration(
    load_tiny, calibration, no_calibration, family, method
):
    model, tokenizer, _ = load_tiny(family)
    with pytest.raises(MoEModelError, match=UNSUPPORTED[(family, method)]):
        oneshot(
            model=model,
            dataset=calibration(family, num_samples=NUM_SAMPLES),
            recipe=[MODIFIERS[method]()],
            processor=tokenizer,
            num_calibration_samples=NUM_SAMPLES,
            max_seq_length=SEQ_LEN,
        )


def test_every_family_has_a_tiny_config_and_a_row():
    assert set(FAMILIES) <= set(TINY_CONFIGS) <= set(ARCHITECTURES)
