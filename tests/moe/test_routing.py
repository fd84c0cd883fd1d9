import pytest
import torch

from ream_modifiers.moe import find_moe_layers
from tests.conftest import ROUTING_TYPES, sample_input_ids


@pytest.mark.parametrize("model_type", ROUTING_TYPES)
def test_route_reproduces_the_model_router(load_tiny, model_type):
    model, _, _ = load_tiny(model_type)
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
