import pytest
import torch
from llmcompressor import oneshot
from pydantic import ValidationError

from ream_modifiers import (
    EANPruningModifier,
    FrequencyPruningModifier,
    HCSMoEModifier,
    MSMoEModifier,
    REAMModifier,
    REAPModifier,
)
from ream_modifiers.engines.align import match_neurons, weight_descriptors
from ream_modifiers.modifiers.base import LayerDecision
from ream_modifiers.moe import find_moe_layers
from tests.conftest import copy_expert, run_modifier


def _run(load_tiny, calibration, tmp_path, model_type, modifier):
    model, tokenizer, _ = load_tiny(model_type)
    return model, run_modifier(model, tokenizer, calibration(model_type), modifier)


def test_merging_identical_experts_keeps_the_function(load_tiny):
    model, _, _ = load_tiny("qwen3_moe")
    layer = find_moe_layers(model)[0]
    original = layer.stacked_weights([0])
    perm = torch.randperm(128, generator=torch.Generator().manual_seed(0))
    copy_expert(layer, 0, 1)
    copy_expert(layer, 0, 2, perm)  # a neuron-shuffled copy
    hidden = torch.randn(256, 128)
    with torch.no_grad():
        before = layer.block(hidden.unsqueeze(0)).squeeze(0)
        index, _ = layer.route(hidden)
    weights = layer.stacked_weights()
    perms = match_neurons(0, [1, 2], [weight_descriptors(weights, [0, 1, 2], dim=16)])
    kept = [0, 3, 4, 5, 6, 7]
    plan = {0: ([0, 1, 2], [0.5, 0.3, 0.2], [None, *perms])}
    REAMModifier(num_experts=6).apply(layer, LayerDecision(kept=kept, plan=plan))
    with torch.no_grad():
        after = layer.block(hidden.unsqueeze(0)).squeeze(0)
    untouched = ~((index == 1) | (index == 2)).any(-1)
    assert untouched.sum() > 50
    torch.testing.assert_close(
        after[untouched], before[untouched], rtol=1e-5, atol=1e-5
    )
    # the merged expert is the original expert 0 again (not just the same object)
    merged = layer.stacked_weights([0])
    for name in ("gate", "up", "down"):
        torch.testing.assert_close(getattr(merged, name), getattr(original, name))


@pytest.mark.parametrize("score", ["reap", "ream"])
def test_merge_none_keeps_the_same_experts_as_reap(
    load_tiny, calibration, tmp_path, score
):
    _, ream = _run(
        load_tiny,
        calibration,
        tmp_path,
        "qwen3_moe",
        REAMModifier(
            num_experts=5,
            merge="none",
            group_size=0,
            saliency=score,
            report_path=str(tmp_path / "ream.json"),
        ),
    )
    _, reap = _run(
        load_tiny,
        calibration,
        tmp_path,
        "qwen3_moe",
        REAPModifier(
            num_experts=5, saliency=score, report_path=str(tmp_path / "reap.json")
        ),
    )
    for name, entry in reap["layers"].items():
        assert ream["layers"][name]["kept"] == entry["kept"]


@pytest.mark.parametrize("model_type", ["qwen3_moe", "deepseek_v3"])
def test_ream_report_groups_and_centroids(load_tiny, calibration, tmp_path, model_type):
    model, report = _run(
        load_tiny,
        calibration,
        tmp_path,
        model_type,
        REAMModifier(sparsity=0.5, group_size=4, report_path=str(tmp_path / "r.json")),
    )
    for entry in report["layers"].values():
        scores = torch.tensor(entry["scores"])
        size = 4 if model_type == "deepseek_v3" else 8  # router groups of 4
        for lo in range(0, 8, size):
            part = scores[lo : lo + size]
            top = (part.argsort(descending=True)[: len(part) // 2] + lo).tolist()
            assert sorted(e for e in entry["kept"] if lo <= e < lo + size) == sorted(
                top
            )
        for centroid, members in entry["groups"].items():
            assert len(members) <= 3
            # groups never cross router groups
            assert {int(centroid) // size} == {m // size for m in members}
            assert sum(entry["coefficients"][centroid]) == pytest.approx(1.0)
        assert entry["alignment_seconds"] >= 0
    layer = find_moe_layers(model)[0]
    assert layer.num_experts == 4


@pytest.mark.parametrize(
    "modifier",
    [
        HCSMoEModifier(sparsity=0.25),
        MSMoEModifier(sparsity=0.25),
        FrequencyPruningModifier(sparsity=0.25),
        EANPruningModifier(sparsity=0.25),
    ],
)
def test_baselines_run_from_named_modifiers(load_tiny, calibration, tmp_path, modifier):
    modifier.report_path = str(tmp_path / "b.json")
    model, report = _run(load_tiny, calibration, tmp_path, "qwen3_moe", modifier)
    assert report["method"] == modifier.method
    assert all(len(e["kept"]) == 6 for e in report["layers"].values())
    if isinstance(modifier, (HCSMoEModifier, MSMoEModifier)):
        assert any(e["groups"] for e in report["layers"].values())


def test_frequency_modifier_is_reap_with_frequency_saliency(
    load_tiny, calibration, tmp_path
):
    _, named = _run(
        load_tiny,
        calibration,
        tmp_path,
        "mixtral",
        FrequencyPruningModifier(sparsity=0.5, report_path=str(tmp_path / "f.json")),
    )
    _, generic = _run(
        load_tiny,
        calibration,
        tmp_path,
        "mixtral",
        REAPModifier(
            sparsity=0.5, saliency="frequency", report_path=str(tmp_path / "g.json")
        ),
    )

    def untimed(layers: dict) -> dict:
        return {
            name: {k: v for k, v in entry.items() if not k.endswith("seconds")}
            for name, entry in layers.items()
        }

    assert untimed(named["layers"]) == untimed(generic["layers"])


def test_group_size_too_small_fails_before_calibration(
    load_tiny, calibration, no_calibration
):
    model, tokenizer, _ = load_tiny("qwen3_moe")
    with pytest.raises(ValueError, match="group_size >= 4"):
        oneshot(
            model=model,
            dataset=calibration("qwen3_moe"),
            processor=tokenizer,
            recipe=[REAMModifier(num_experts=2, group_size=3)],
        )
    with pytest.raises(ValidationError, match="group_size must be 0"):
        REAMModifier(sparsity=0.5, group_size=1)


def test_merging_needs_all_expert_outputs(load_tiny, calibration):
    model, tokenizer, _ = load_tiny("qwen3_moe")
    with pytest.raises(ValueError, match="moe_calibrate_all_experts=True"):
        oneshot(
            model=model,
            dataset=calibration("qwen3_moe"),
            processor=tokenizer,
            recipe=[REAMModifier(sparsity=0.25)],
            moe_calibrate_all_experts=False,
        )


def _hook_count(module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules()
    )


def test_each_layer_drops_its_hooks_and_statistics_once_decided(load_tiny, calibration):
    """A decided layer's hooks (which hold its [E, capacity, D] activation
    samples) are removed at once, not at the end of calibration."""
    live_at_apply = []

    class Probe(REAMModifier):
        def write(self, layer, decision, read):
            super().write(layer, decision, read)
            live_at_apply.append(
                [_hook_count(other.experts) > 0 for other in self._layers]
            )

    model, tokenizer, _ = load_tiny("qwen3_moe")
    run_modifier(model, tokenizer, calibration("qwen3_moe"), Probe(sparsity=0.5))
    layers = len(live_at_apply)
    assert layers == 2
    # while layer i is applied, layers before it have no hooks left
    expected = [[j >= i for j in range(layers)] for i in range(layers)]
    assert live_at_apply == expected


@pytest.mark.parametrize("model_type", ["qwen3_moe", "deepseek_v3"])
def test_verify_merges_keeps_only_merges_that_reduce_the_error(
    load_tiny, calibration, tmp_path, model_type
):
    report = tmp_path / "verify.json"
    modifier = REAMModifier(
        num_experts=4, verify_merges=True, group_size=0, report_path=str(report)
    )
    _, verified = _run(load_tiny, calibration, tmp_path, model_type, modifier)
    modifier = REAMModifier(
        num_experts=4, verify_merges=False, group_size=0, report_path=str(report)
    )
    _, unverified = _run(load_tiny, calibration, tmp_path, model_type, modifier)
    undone_any = False
    first = next(iter(verified["layers"]))
    for name, entry in verified["layers"].items():
        errors = {int(c): e for c, e in entry["merge_errors"].items()}
        assert entry["verify_tokens"] > 0
        for centroid in entry["groups"]:
            # a merge that stayed reduced the replayed layer's output error
            error = errors[int(centroid)]
            assert error["merged"] < error["centroid"]
        for centroid in entry["merges_undone"]:
            assert str(centroid) not in entry["groups"]
            undone_any = True
        if name == first:  # later layers calibrate on different inputs
            # the same groups were proposed; verifying only removes merges
            proposed = unverified["layers"][name]["groups"]
            assert set(errors) == {int(c) for c in proposed}
            assert entry["kept"] == unverified["layers"][name]["kept"]
    assert undone_any or any(e["groups"] for e in verified["layers"].values())


def test_neuron_descriptors_are_held_one_group_at_a_time(
    load_tiny, calibration, tmp_path, monkeypatch
):
    # a layer's activation descriptors in fp32 are twice its activation samples
    # (more than the layer's expert weights in bf16): building them for every
    # merged expert before matching was the largest transient of a REAM decision
    import weakref

    from ream_modifiers.engines import align
    from ream_modifiers.modifiers import merging

    live: weakref.WeakSet = weakref.WeakSet()
    most_alive = [0]

    def tracked(describe):
        def wrapper(*args):
            descriptor = describe(*args)
            live.add(descriptor)
            most_alive[0] = max(most_alive[0], len(live))
            return descriptor

        return wrapper

    monkeypatch.setattr(
        merging, "activation_descriptor", tracked(align.activation_descriptor)
    )
    monkeypatch.setattr(
        merging, "weight_pca", lambda *args: tracked(align.weight_pca(*args))
    )
    _, report = _run(
        load_tiny,
        calibration,
        tmp_path,
        "qwen3_moe",
        REAMModifier(
            num_experts=3,
            group_size=3,
            merge="aligned",
            verify_merges=False,
            report_path=str(tmp_path / "ream.json"),
        ),
    )
    groups = [entry["groups"] for entry in report["layers"].values()]
    largest = max(len(m) + 1 for layer in groups for m in layer.values())
    involved = max(sum(len(m) + 1 for m in layer.values()) for layer in groups)
    assert involved > largest  # several groups merged in one layer
    assert most_alive[0] == 2 * largest  # activations and weights, one group
