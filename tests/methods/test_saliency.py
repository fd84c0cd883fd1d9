import pytest
import torch

from ream_modifiers.methods.saliency import saliency, super_expert_mask

SUMS = {
    "count": torch.tensor([4.0, 0.0, 2.0, 1.0], dtype=torch.float64),
    "weighted_norm": torch.tensor([2.0, 0.0, 3.0, 0.25], dtype=torch.float64),
    "norm": torch.tensor([8.0, 0.0, 5.0, 1.0], dtype=torch.float64),
    "weight": torch.tensor([1.0, 0.0, 1.2, 0.25], dtype=torch.float64),
}


def test_reap_is_the_mean_over_routed_tokens_and_zero_when_unrouted():
    assert saliency(SUMS, "reap").tolist() == [0.5, 0.0, 1.5, 0.25]


@pytest.mark.parametrize(
    "metric, expected",
    [
        ("ean", [8.0, 0.0, 5.0, 1.0]),
        ("ean_mean", [2.0, 0.0, 2.5, 1.0]),
        ("frequency", [4.0, 0.0, 2.0, 1.0]),
        ("weighted_frequency", [1.0, 0.0, 1.2, 0.25]),
    ],
)
def test_baseline_metrics(metric, expected):
    assert saliency(SUMS, metric).tolist() == pytest.approx(expected)


def test_unknown_metric():
    with pytest.raises(ValueError, match="unknown saliency 'nope'"):
        saliency(SUMS, "nope")


def test_super_expert_rule_needs_both_thresholds():
    pool = torch.tensor([1.0] * 199 + [50.0])
    layer = torch.tensor([1.0, 50.0, 4.0])
    mask = super_expert_mask(layer, torch.cat([pool, layer]))
    assert mask.tolist() == [False, True, False]
