import pytest
import torch
from llmcompressor.modeling.moe.context import moe_calibration_context

from ream_modifiers.moe import find_moe_layers
from ream_modifiers.observe import (
    LayerStatsCollector,
    MeanExpertOutput,
    RoutedExpertSums,
)
from tests.conftest import hook_registrar, sample_input_ids


def _expected_sums(layer, hidden, index, weights, valid):
    """Straight loop over tokens and slots: the definition of the sums."""
    expected = {
        k: torch.zeros(8, dtype=torch.float64)
        for k in ("count", "weighted_norm", "norm", "weight")
    }
    mean_sum = torch.zeros(8, 128, dtype=torch.float64)
    with torch.no_grad():
        outputs = torch.stack([layer.expert(e)(hidden) for e in range(8)])  # [E, T, H]
    for t in range(hidden.shape[0]):
        if not valid[t]:
            continue
        mean_sum += outputs[:, t].double()
        for s in range(index.shape[1]):
            e, g = int(index[t, s]), float(weights[t, s])
            norm = float(outputs[e, t].norm())
            expected["count"][e] += 1
            expected["weighted_norm"][e] += g * norm
            expected["norm"][e] += norm
            expected["weight"][e] += g
    return expected, mean_sum, outputs


@pytest.mark.parametrize("all_experts", [False, True])
@pytest.mark.parametrize("model_type", ["qwen3_moe", "deepseek_v3"])
def test_routed_sums_match_a_hand_computation(load_tiny, model_type, all_experts):
    model, _, _ = load_tiny(model_type)
    layer = find_moe_layers(model)[0]
    ids = sample_input_ids(batch=2, length=10)
    valid = torch.ones(20, dtype=torch.bool)
    valid[7:10] = False  # right padding in the first row
    statistics = [RoutedExpertSums(8)] + ([MeanExpertOutput(8)] if all_experts else [])
    collector = LayerStatsCollector(layer, statistics, padding_masks=[valid])
    seen, handles = {}, []
    handles.append(
        layer.experts.register_forward_pre_hook(
            lambda m, args: seen.update(args=args[:3])
        )
    )
    collector.attach(hook_registrar(handles))
    with torch.no_grad():
        if all_experts:
            with moe_calibration_context():
                model(ids)
        else:
            model(ids)
    for handle in handles:
        handle.remove()
    hidden, index, weights = seen["args"]
    expected, mean_sum, outputs = _expected_sums(layer, hidden, index, weights, valid)
    sums = collector["routed"].tensors
    for key, value in expected.items():
        torch.testing.assert_close(sums[key], value, rtol=1e-6, atol=1e-6)
    assert collector.tokens_seen == 17 and collector.batches_seen == 1
    peak = torch.tensor(
        [
            outputs[e][(index == e).any(-1) & valid].abs().max()
            if expected["count"][e]
            else 0.0
            for e in range(8)
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(sums["max_activation"], peak, rtol=1e-6, atol=1e-6)
    if all_experts:
        torch.testing.assert_close(collector["mean_output"].mean(), mean_sum / 17)


def test_mean_output_requires_all_experts(load_tiny):
    model, _, _ = load_tiny("qwen3_moe")
    layer = find_moe_layers(model)[0]
    collector = LayerStatsCollector(layer, [MeanExpertOutput(8)])
    handles = []
    collector.attach(hook_registrar(handles))
    with pytest.raises(RuntimeError, match="moe_calibrate_all_experts=True"):
        with torch.no_grad():
            model(sample_input_ids())


def test_padding_mask_of_the_wrong_size_is_an_error(load_tiny):
    model, _, _ = load_tiny("mixtral")
    layer = find_moe_layers(model)[0]
    collector = LayerStatsCollector(
        layer, [RoutedExpertSums(8)], padding_masks=[torch.ones(5, dtype=torch.bool)]
    )
    collector.attach(hook_registrar([]))
    with pytest.raises(RuntimeError, match="cannot be excluded"):
        with torch.no_grad():
            model(sample_input_ids())


def test_memory_does_not_grow_with_batches(load_tiny):
    model, _, _ = load_tiny("qwen3_moe")
    layer = find_moe_layers(model)[0]
    collector = LayerStatsCollector(layer, [RoutedExpertSums(8)])
    collector.attach(hook_registrar([]))
    with torch.no_grad():
        model(sample_input_ids(seed=1))
        sizes = {k: v.numel() for k, v in collector["routed"].tensors.items()}
        for seed in range(2, 6):
            model(sample_input_ids(seed=seed))
    assert {k: v.numel() for k, v in collector["routed"].tensors.items()} == sizes
    assert (
        collector.batches_seen == 5
        and collector["routed"].tensors["count"].sum() == 5 * 48 * 2
    )


def _hand_p_squared_norms(layer, hidden, index, valid):
    """Per expert: p^2*||f|| of each routed valid token, p from the raw router."""
    logits = (hidden.double() @ layer.router_weight.double().T).float()
    if layer.router_bias is not None:
        logits = logits + layer.router_bias.float()
    sigmoid = layer.routing.scoring == "sigmoid"
    p = logits.sigmoid() if sigmoid else logits.softmax(dim=-1)
    per_expert: dict[int, list[float]] = {e: [] for e in range(layer.num_experts)}
    with torch.no_grad():
        for t in range(hidden.shape[0]):
            if not valid[t]:
                continue
            for e in index[t].tolist():
                norm = float(layer.expert(e)(hidden[t : t + 1]).norm())
                per_expert[e].append(float(p[t, e]) ** 2 * norm)
    return per_expert


@pytest.mark.parametrize("model_type", ["qwen3_moe", "deepseek_v3", "minimax_m2"])
def test_p_squared_sums_match_a_hand_computation(load_tiny, model_type):
    """
    REAM's saliency inputs over two batches: the exact sum and the mean of
    per-batch means of p^2*||f|| over routed tokens, p the router's score before
    selection (softmax, or sigmoid without the correction bias).
    """
    from ream_modifiers.engines.saliency import saliency

    model, _, _ = load_tiny(model_type)
    layer = find_moe_layers(model)[0]
    if layer.correction_bias is not None:
        # a bias that changes the selection, so ignoring it would be caught
        with torch.no_grad():
            layer.correction_bias.copy_(torch.linspace(-0.5, 0.5, layer.num_experts))
    valid = torch.ones(20, dtype=torch.bool)
    valid[6:10] = False
    statistic = RoutedExpertSums(layer.num_experts, probabilities=True)
    collector = LayerStatsCollector(layer, [statistic], padding_masks=[valid, None])
    seen, handles = [], []
    handles.append(
        layer.experts.register_forward_pre_hook(lambda m, args: seen.append(args[:3]))
    )
    collector.attach(hook_registrar(handles))
    with torch.no_grad():
        model(sample_input_ids(batch=2, length=10, seed=3))
        model(sample_input_ids(batch=1, length=12, seed=4))
    for handle in handles:
        handle.remove()
    totals = torch.zeros(layer.num_experts, dtype=torch.float64)
    counts = torch.zeros(layer.num_experts, dtype=torch.float64)
    batch_means = torch.zeros(layer.num_experts, dtype=torch.float64)
    masks = [valid, torch.ones(12, dtype=torch.bool)]
    for (hidden, index, _), mask in zip(seen, masks, strict=True):
        for e, values in _hand_p_squared_norms(layer, hidden, index, mask).items():
            totals[e] += sum(values)
            counts[e] += len(values)
            batch_means[e] += sum(values) / len(values) if values else 0.0
    sums = statistic.tensors
    torch.testing.assert_close(sums["prob_sq_norm"], totals, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(sums["batches"], torch.full_like(totals, 2.0))
    torch.testing.assert_close(
        saliency(sums, "ream"), batch_means / 2, rtol=1e-5, atol=1e-7
    )
    expected_tokens = torch.where(counts > 0, totals / counts.clamp(min=1), 0.0)
    torch.testing.assert_close(
        saliency(sums, "ream_tokens"), expected_tokens, rtol=1e-5, atol=1e-7
    )
    # some expert is routed in one batch only: the two averages differ
    assert not torch.allclose(saliency(sums, "ream"), expected_tokens)


@pytest.mark.parametrize("wrong", ["renormalize", "scoring"])
def test_routing_rules_that_do_not_reproduce_the_model_stop_calibration(
    load_tiny, wrong
):
    """An unlisted family is routed by rules detected from its config; wrong ones
    (here: a renormalisation or a scoring the model does not apply) stop the
    first calibration batch, naming the layer and the table row to fix."""
    import dataclasses

    from ream_modifiers.moe import MoEModelError

    model, _, _ = load_tiny("qwen3_moe")
    layer = find_moe_layers(model)[0]
    changed = {"renormalize": False} if wrong == "renormalize" else {}
    if wrong == "scoring":
        changed = {"scoring": "sigmoid"}
    layer.routing = dataclasses.replace(layer.routing, **changed)
    collector = LayerStatsCollector(layer, [RoutedExpertSums(8)])
    collector.attach(hook_registrar([]))
    with pytest.raises(MoEModelError) as refused:
        with torch.no_grad():
            model(sample_input_ids())
    message = str(refused.value)
    assert message.startswith("model.layers.0.mlp: the routing rules for model_type")
    assert "'qwen3_moe' do not reproduce the model's router" in message
    assert "architectures.yaml" in message


def test_routing_check_accepts_the_models_own_routing(load_tiny):
    model, _, _ = load_tiny("deepseek_v3")
    layer = find_moe_layers(model)[0]
    hidden = torch.randn(32, 128)
    index, weights = layer.route(hidden)
    assert layer.routing_disagreement(hidden, index.flip(-1), weights.flip(-1)) is None
    other = index.roll(1, dims=-1)  # same experts, weights moved to other slots
    assert "routing weights differ" in layer.routing_disagreement(
        hidden, other, weights
    )


@pytest.mark.parametrize("model_type", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_routing_check_passes_bf16_models(tiny_model_dir, model_type):
    """In bf16 a router computed in the weights' dtype (Qwen3, gpt-oss) and one
    computed in fp32 (DeepSeek-V3) both pass: near-ties that flip between the
    two precisions are not a wrong rule."""
    from ream_modifiers.moe import load_moe_model

    model = load_moe_model(tiny_model_dir(model_type), dtype=torch.bfloat16)
    layers = find_moe_layers(model)
    seen = {}

    def capture(name):
        def hook(module, args):
            seen.setdefault(name, tuple(a.detach() for a in args[:3]))

        return hook

    handles = [
        layer.experts.register_forward_pre_hook(capture(layer.name)) for layer in layers
    ]
    with torch.no_grad():
        model(torch.randint(0, 512, (8, 64)))
    for handle in handles:
        handle.remove()
    for layer in layers:
        assert layer.routing_disagreement(*seen[layer.name]) is None, layer.name


def test_routing_check_accepts_near_ties_flipped_by_bf16(tmp_path):
    """64 experts, top-8, bf16: the router computes its logits in bf16, and
    from fp32 logits a few percent of the tokens get another expert at the
    k-th place. Rules that reproduce the model from bf16 logits pass."""
    from ream_modifiers.moe import load_moe_model
    from ream_modifiers.tiny import build_tiny_moe

    path = build_tiny_moe(
        "qwen3_moe", tmp_path / "m", num_experts=64, num_experts_per_tok=8
    )
    model = load_moe_model(path, dtype=torch.bfloat16)
    layer = find_moe_layers(model)[0]
    seen = []
    handle = layer.experts.register_forward_pre_hook(
        lambda module, args: seen.append(tuple(a.detach() for a in args[:3]))
    )
    torch.manual_seed(0)
    with torch.no_grad():
        model(torch.randint(0, 512, (8, 64)))
    handle.remove()
    hidden, index, weights = seen[0]
    from_fp32 = layer._disagreement(*layer.route(hidden), index, weights)
    assert from_fp32 is not None and "of the tokens get other experts" in from_fp32
    assert layer.routing_disagreement(hidden, index, weights) is None
