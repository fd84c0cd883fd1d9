from typing import get_args

import pytest
import torch

from ream_modifiers.engines.saliency import (
    SALIENCY_METRICS,
    Saliency,
    saliency,
    super_expert_mask,
)

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


PROBABILITY_SUMS = {
    **SUMS,
    "prob_sq_norm": torch.tensor([1.0, 0.0, 0.9, 0.04], dtype=torch.float64),
    # two batches: expert 3 routed in one only, so its mean of means is halved
    "prob_sq_norm_batch_means": torch.tensor(
        [0.5, 0.0, 0.9, 0.04], dtype=torch.float64
    ),
    "batches": torch.tensor([2.0, 2.0, 2.0, 2.0], dtype=torch.float64),
}


def test_ream_is_the_mean_of_per_batch_means():
    assert saliency(PROBABILITY_SUMS, "ream").tolist() == pytest.approx(
        [0.25, 0.0, 0.45, 0.02]
    )


def test_ream_tokens_is_the_exact_mean_over_routed_tokens():
    assert saliency(PROBABILITY_SUMS, "ream_tokens").tolist() == pytest.approx(
        [0.25, 0.0, 0.45, 0.04]
    )


def test_p_squared_metrics_name_the_missing_sums():
    with pytest.raises(ValueError, match="probabilities=True"):
        saliency(SUMS, "ream")


def test_every_declared_saliency_has_a_metric():
    assert set(get_args(Saliency)) == set(SALIENCY_METRICS)


def test_unknown_metric():
    with pytest.raises(ValueError, match="unknown saliency 'nope'"):
        saliency(SUMS, "nope")


def test_super_expert_rule_needs_both_thresholds():
    pool = torch.tensor([1.0] * 199 + [50.0])
    layer = torch.tensor([1.0, 50.0, 4.0])
    mask = super_expert_mask(layer, torch.cat([pool, layer]))
    assert mask.tolist() == [False, True, False]
