import pytest
import torch

from ream_modifiers.moe import find_moe_layers, load_moe_model
from ream_modifiers.tiny import build_tiny_moe
from tests.conftest import ROUTING_TYPES, sample_input_ids


def _assert_route_matches_the_model(model) -> None:
    layers = find_moe_layers(model)
    seen = {}

    def capture(name):
        def hook(module, args):
            seen[name] = args[:3]

        return hook

    handles = [
        layer.experts.register_forward_pre_hook(capture(layer.name)) for layer in layers
    ]
    with torch.no_grad():
        model(sample_input_ids())
    for handle in handles:
        handle.remove()
    for layer in layers:
        hidden, model_index, model_weights = seen[layer.name]
        index, weights = layer.route(hidden)
        # compare as sets per token: the selection order is not part of the contract
        order_model = model_index.sort(dim=-1)
        order_ours = index.sort(dim=-1)
        assert torch.equal(order_model.values, order_ours.values)
        torch.testing.assert_close(
            model_weights.float().gather(-1, order_model.indices),
            weights.gather(-1, order_ours.indices),
            rtol=1e-5,
            atol=1e-6,
        )


@pytest.mark.parametrize("model_type", ROUTING_TYPES)
def test_route_reproduces_the_model_router(load_tiny, model_type):
    model, _, _ = load_tiny(model_type)
    _assert_route_matches_the_model(model)


@pytest.mark.parametrize(
    "selection, normalized",
    [("softmax", False), ("softmax", True), ("sigmoid", True), ("sigmoid", False)],
)
def test_cohere2_moe_scoring_follows_the_checkpoint(tmp_path, selection, normalized):
    # softmax over the top-k logits sums to 1 whatever norm_topk_prob says
    build_tiny_moe(
        "cohere2_moe",
        tmp_path,
        expert_selection_fn=selection,
        norm_topk_prob=normalized,
    )
    model = load_moe_model(tmp_path, dtype=torch.float32)
    routing = find_moe_layers(model)[0].routing
    assert routing.scoring == selection
    assert routing.renormalize == (selection == "softmax" or normalized)
    _assert_route_matches_the_model(model)


def test_an_unknown_selection_function_is_refused_before_calibration(tmp_path):
    build_tiny_moe("cohere2_moe", tmp_path)
    model = load_moe_model(tmp_path, dtype=torch.float32)
    model.config.expert_selection_fn = "sparsemax"
    with pytest.raises(ValueError, match="expert_selection_fn: sparsemax"):
        find_moe_layers(model)


def test_deepseek_group_limited_routing_stays_inside_topk_groups(load_tiny):
    model, _, _ = load_tiny("deepseek_v3")
    layer = find_moe_layers(model)[0]
    hidden = torch.randn(64, 128)
    index, weights = layer.route(hidden)
    groups = index // layer.routing.group_size
    # topk_group = 1: both experts of a token come from a single group
    assert torch.equal(groups[:, 0], groups[:, 1])
    # renormalised then scaled by routed_scaling_factor
    torch.testing.assert_close(weights.sum(-1), torch.full((64,), 2.5))
