import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from ream_modifiers.moe import (
    MoEModelError,
    find_moe_layers,
    keep_experts,
    patch_saved_config,
    set_router_rows,
    sync_config,
    write_expert,
)
from ream_modifiers.moe.architectures import get_arch_spec
from ream_modifiers.tiny import TINY_CONFIGS
from tests.conftest import sample_input_ids


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_stacked_weights_view(load_tiny):
    model, _, _ = load_tiny("qwen3_moe")
    layer = find_moe_layers(model)[0]
    weights = layer.stacked_weights()
    assert weights.gate.shape == (8, 128, 128) and weights.down.shape == (8, 128, 128)
    assert torch.equal(weights.up[3], layer.expert(3).up_proj.weight)
    assert torch.equal(weights.down[5], layer.expert(5).down_proj.weight)
    assert layer.shared_experts == []


def test_deepseek_layer_exposes_bias_and_shared_experts(load_tiny):
    model, _, _ = load_tiny("deepseek_v3")
    layers = find_moe_layers(model)
    assert [layer.name for layer in layers] == [
        "model.layers.1.mlp",
        "model.layers.2.mlp",
    ]
    layer = layers[0]
    assert layer.correction_bias is layer.router.e_score_correction_bias
    assert layer.correction_bias.abs().sum() > 0
    assert layer.shared_experts == [layer.block.shared_experts]


def test_reordering_all_experts_keeps_logits_and_module_objects(load_tiny):
    model, _, _ = load_tiny("deepseek_v3")
    ids = sample_input_ids()
    before = _logits(model, ids)
    layer = find_moe_layers(model)[0]
    objects = layer.expert_modules()
    bias = layer.correction_bias.clone()
    # reverse inside each group: group membership is positional
    order = [3, 2, 1, 0, 7, 6, 5, 4]
    keep_experts(layer, order)
    assert [id(m) for m in layer.expert_modules()] == [id(objects[i]) for i in order]
    assert torch.equal(layer.correction_bias, bias[order])
    torch.testing.assert_close(_logits(model, ids), before, rtol=1e-5, atol=1e-5)


def test_pruning_equals_masking_the_router(load_tiny):
    """With renormalised top-k, removing experts == never routing to them."""
    model, _, _ = load_tiny("qwen3_moe")
    ids = sample_input_ids()
    layers = find_moe_layers(model)
    drop = [1, 6]

    def masked_router(layer):
        def forward(hidden):
            logits = layer.router_logits(hidden.reshape(-1, 128))
            logits[:, drop] = float("-inf")
            index, weights = layer.routing.route(logits)
            return logits, weights, index

        return forward

    for layer in layers:
        layer.router.forward = masked_router(layer)
    masked = _logits(model, ids)
    for layer in layers:
        del layer.router.forward
        keep_experts(layer, [i for i in range(8) if i not in drop])
        assert layer.num_experts == 6 and layer.experts.num_experts == 6
        assert layer.router.weight.shape == (6, 128) and layer.router.num_experts == 6
    torch.testing.assert_close(_logits(model, ids), masked, rtol=1e-5, atol=1e-5)


def test_keep_experts_rejects_bad_indices(load_tiny):
    model, _, _ = load_tiny("mixtral")
    layer = find_moe_layers(model)[0]
    with pytest.raises(ValueError, match="distinct expert indices"):
        keep_experts(layer, [0, 0, 1])
    with pytest.raises(ValueError, match="distinct expert indices"):
        keep_experts(layer, [0, 8])


def test_write_expert_and_router_rows_in_place(load_tiny):
    model, _, _ = load_tiny("mixtral")
    layer = find_moe_layers(model)[0]
    param = layer.expert(2).gate_proj.weight
    new = torch.randn_like(param)
    write_expert(layer, 2, gate=new)
    assert layer.expert(2).gate_proj.weight is param and torch.equal(param, new)
    with pytest.raises(ValueError, match="cannot write"):
        write_expert(layer, 2, up=torch.zeros(3, 3))
    rows = torch.randn(8, 128)
    set_router_rows(layer, rows)
    assert torch.equal(layer.router.weight, rows)


def test_sync_config_and_patch_saved_config(load_tiny, tmp_path):
    model, _, _ = load_tiny("deepseek_v3")
    sync_config(model, get_arch_spec(model.config), 6)
    assert model.config.n_routed_experts == 6
    (tmp_path / "config.json").write_text(json.dumps({"n_routed_experts": 8, "x": 1}))
    patch_saved_config(tmp_path, {"n_routed_experts": 6})
    assert json.loads((tmp_path / "config.json").read_text()) == {
        "n_routed_experts": 6,
        "x": 1,
    }


def test_find_moe_layers_errors(load_tiny, tmp_path):
    dense = AutoModelForCausalLM.from_config(
        LlamaConfig(
            hidden_size=64,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            vocab_size=64,
        )
    )
    with pytest.raises(ValueError, match="not an MoE model"):
        find_moe_layers(dense)
    model, _, path = load_tiny("qwen3_moe")
    with pytest.raises(MoEModelError, match="after applying `ignore`"):
        find_moe_layers(model, ignore=["re:.*mlp$"])
    fused = AutoModelForCausalLM.from_pretrained(path)
    with pytest.raises(MoEModelError, match="still fused"):
        find_moe_layers(fused)


def test_find_moe_layers_refuses_experts_stored_compressed(load_tiny):
    """What a W4A16 checkpoint loads as: packed integers and scales in place of
    `weight` (compressed-tensors), which every method would fail on later."""
    model, _, _ = load_tiny("qwen3_moe")
    linear = model.model.layers[1].mlp.experts[0].down_proj
    packed = torch.zeros(
        linear.out_features, linear.in_features // 8, dtype=torch.int32
    )
    del linear.weight
    linear.register_parameter("weight_packed", torch.nn.Parameter(packed, False))
    with pytest.raises(MoEModelError) as refused:
        find_moe_layers(model)
    assert "model.layers.1.mlp: expert down_proj holds no full-precision" in str(
        refused.value
    )
    assert "['weight_packed']" in str(refused.value)
    assert "already quantized" in str(refused.value)


FAMILIES = sorted(TINY_CONFIGS)


def _permutation(layer) -> list[int]:
    """Reverse the experts inside each router group (membership is positional)."""
    return [e for group in layer.router_groups() for e in reversed(group)]


@pytest.mark.parametrize("model_type", FAMILIES)
def test_layer_routes_like_the_model_and_permutes_exactly(load_tiny, model_type):
    """
    Our routing reproduces the model's top-k for every family, and reordering
    the experts with keep_experts (router rows, logit and correction biases,
    expert biases, cached counts) leaves the logits unchanged.
    """
    model, _, _ = load_tiny(model_type)
    ids = sample_input_ids()
    # the last layer that text reaches (not ERNIE-4.5-VL's vision set)
    layer = [
        one
        for one in find_moe_layers(model)
        if not one.name.endswith(one.spec.expert_sets[1:])
    ][-1]
    seen = {}
    handle = layer.experts.register_forward_pre_hook(
        lambda module, args: seen.update(args=args)
    )
    before = _logits(model, ids)
    handle.remove()
    hidden, index, weights = seen["args"]
    our_index, our_weights = layer.route(hidden)
    assert torch.equal(index.sort(-1).values, our_index.sort(-1).values)
    torch.testing.assert_close(
        weights.sort(-1).values, our_weights.to(weights.dtype).sort(-1).values
    )
    bias = layer.correction_bias
    bias = None if bias is None else bias.detach().clone()
    order = _permutation(layer)
    for one in find_moe_layers(model):
        keep_experts(one, order)
    if bias is not None:
        assert torch.equal(layer.correction_bias, bias[..., order])
    torch.testing.assert_close(_logits(model, ids), before, rtol=1e-5, atol=1e-5)


def test_gpt_oss_pruning_keeps_the_right_bias_rows(load_tiny):
    model, _, _ = load_tiny("gpt_oss")
    layer = find_moe_layers(model)[0]
    router_bias = layer.router_bias.detach().clone()
    up_bias = layer.stacked_weights().up_bias
    down_bias = layer.stacked_weights().down_bias
    assert up_bias.abs().sum() > 0 and router_bias.abs().sum() > 0
    keep = [7, 1, 4]
    keep_experts(layer, keep)
    kept = layer.stacked_weights()
    assert torch.equal(layer.router_bias, router_bias[keep])
    assert torch.equal(kept.up_bias, up_bias[keep])
    assert torch.equal(kept.down_bias, down_bias[keep])
    assert layer.router.num_experts == 3 and layer.experts.num_experts == 3


def test_gpt_oss_merge_averages_biases(load_tiny):
    from ream_modifiers.engines.merge import merge_group

    model, _, _ = load_tiny("gpt_oss")
    layer = find_moe_layers(model)[0]
    weights = layer.stacked_weights()
    perm = torch.randperm(
        weights.gate.shape[1], generator=torch.Generator().manual_seed(0)
    )
    merged = merge_group(weights, [2, 5], [0.25, 0.75], [None, perm.tolist()])
    for name in ("gate_bias", "up_bias"):
        stack = getattr(weights, name)
        expected = 0.25 * stack[2] + 0.75 * stack[5][perm]
        torch.testing.assert_close(merged[name], expected)
    # the down bias lives in the output space: it is averaged, never permuted
    torch.testing.assert_close(
        merged["down_bias"], 0.25 * weights.down_bias[2] + 0.75 * weights.down_bias[5]
    )


@pytest.mark.parametrize(
    "model_type", ["qwen3_moe", "deepseek_v3", "gpt_oss", "ernie4_5_moe", "minimax_m2"]
)
def test_routing_among_kept_experts_equals_the_pruned_layer(load_tiny, model_type):
    model, _, _ = load_tiny(model_type)
    layer = find_moe_layers(model)[0]
    kept = [0, 1, 4, 5]  # two per router group where the router has groups
    hidden = torch.randn(64, layer.router_weight.shape[-1])
    index, weights = layer.route(hidden, among=kept)
    keep_experts(layer, kept)
    pruned_index, pruned_weights = layer.route(hidden)
    assert torch.equal(index, pruned_index)
    torch.testing.assert_close(weights, pruned_weights)
