"""The merge check replays the layer exactly as the model runs it."""

import pytest
import torch

from ream_modifiers.engines.merge import merge_group
from ream_modifiers.engines.reproduction import merge_helps
from ream_modifiers.moe import find_moe_layers, keep_experts, write_expert


def _merge_errors(layer, tokens, kept, merged) -> dict:
    """``merge_helps`` with the layer's own routing before and after the cut."""
    return merge_helps(
        tokens,
        layer.route(tokens),
        layer.route(tokens, among=kept),
        kept,
        layer.stacked_weights(),
        merged,
        layer.activation(),
    )


def _block_error(layer, tokens, target) -> float:
    with torch.no_grad():
        out = layer.block(tokens.unsqueeze(0))
    out = out[0] if isinstance(out, tuple) else out
    return float((out[0].double() - target.double()).square().sum())


@pytest.mark.parametrize("model_type", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_errors_equal_the_edited_blocks_output_errors(load_tiny, model_type):
    """
    For each merged centroid, merged minus centroid-alone error equals the change
    of the whole block's squared output error when that one merge is applied to a
    pruned copy of the model (shared experts and untouched tokens cancel).
    """
    model, _, _ = load_tiny(model_type)
    layer = find_moe_layers(model)[0]
    if layer.correction_bias is not None:
        with torch.no_grad():
            layer.correction_bias.copy_(torch.linspace(-0.3, 0.3, layer.num_experts))
    torch.manual_seed(0)
    tokens = torch.randn(40, layer.router_weight.shape[-1])
    kept = [0, 2, 4, 5] if layer.routing.n_group is None else [0, 1, 4, 5]
    dropped = [e for e in range(layer.num_experts) if e not in kept]
    plan = {kept[0]: [kept[0], dropped[0], dropped[1]], kept[2]: [kept[2], dropped[2]]}
    weights = layer.stacked_weights()
    merged = {
        c: merge_group(weights, group, [1.0 / len(group)] * len(group))
        for c, group in plan.items()
    }
    with torch.no_grad():
        target = layer.block(tokens.unsqueeze(0))
    target = (target[0] if isinstance(target, tuple) else target)[0]
    errors = _merge_errors(layer, tokens, kept, merged)
    assert set(errors) == set(plan)
    bias = layer.correction_bias
    pruned_model, _, _ = load_tiny(model_type)
    pruned = find_moe_layers(pruned_model)[0]
    if bias is not None:
        with torch.no_grad():
            pruned.correction_bias.copy_(bias)
    keep_experts(pruned, kept)
    base = _block_error(pruned, tokens, target)
    changes = []
    for centroid, projections in merged.items():
        edited_model, _, _ = load_tiny(model_type)
        edited = find_moe_layers(edited_model)[0]
        if bias is not None:
            with torch.no_grad():
                edited.correction_bias.copy_(bias)
        write_expert(edited, centroid, **projections)
        keep_experts(edited, kept)
        change = _block_error(edited, tokens, target) - base
        expected = errors[centroid]["merged"] - errors[centroid]["centroid"]
        assert change == pytest.approx(expected, rel=1e-3, abs=1e-6)
        changes.append(abs(change))
    assert max(changes) > 1e-3  # some merge really changes the output


def test_a_duplicate_expert_merges_for_free(load_tiny):
    """Merging an exact copy into its centroid leaves the error unchanged."""
    from tests.conftest import copy_expert

    model, _, _ = load_tiny("qwen3_moe")
    layer = find_moe_layers(model)[0]
    copy_expert(layer, 0, 3)
    torch.manual_seed(1)
    tokens = torch.randn(32, layer.router_weight.shape[-1])
    kept = [e for e in range(layer.num_experts) if e != 3]
    weights = layer.stacked_weights()
    merged = {0: merge_group(weights, [0, 3], [0.5, 0.5])}
    errors = _merge_errors(layer, tokens, kept, merged)
    assert errors[0]["merged"] == pytest.approx(errors[0]["centroid"], rel=1e-6)
