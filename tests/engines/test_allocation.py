"""Per-layer budgets from one global ratio."""

import pytest
import torch

from ream_modifiers.engines.allocation import allocate_kept, removal_costs


def test_the_cheapest_removals_go_first_across_layers():
    costs = [
        torch.tensor([0.01, 0.02, 0.5, 0.47]),  # two nearly idle experts
        torch.tensor([0.25, 0.25, 0.25, 0.25]),  # every expert busy
    ]
    # 8 experts, keep 5: removes 0.01, 0.02, then the first 0.25 of layer 1
    assert allocate_kept(costs, 5, min_kept=[1, 1]) == [2, 3]
    # a floor of 3 per layer: the second removal moves to layer 1
    assert allocate_kept(costs, 6, min_kept=[3, 3]) == [3, 3]
    assert allocate_kept(costs, 7, min_kept=[1, 1]) == [3, 4]
    with pytest.raises(ValueError, match="cannot keep 5 experts .* at least"):
        allocate_kept(costs, 5, min_kept=[3, 3])


def test_grouped_routers_lose_one_expert_per_group_a_step():
    # 2 groups of 3; a step removes each group's cheapest
    cheap = torch.tensor([0.1, 0.0, 0.3, 0.0, 0.2, 0.4])
    busy = torch.tensor([0.3, 0.3, 0.3, 0.3, 0.3, 0.3])
    assert allocate_kept([cheap, busy], 8, min_kept=[2, 2], groups=2) == [2, 6]
    with pytest.raises(ValueError, match="steps of 2"):
        allocate_kept([cheap, busy], 9, min_kept=[2, 2], groups=2)


def test_removal_costs_are_shares_or_mass_per_token():
    sums = torch.tensor([1.0, 3.0])
    assert removal_costs(sums, 4, "saliency_fraction").tolist() == [0.25, 0.75]
    assert removal_costs(sums, 2, "saliency_mass").tolist() == [0.5, 1.5]
    with pytest.raises(ValueError, match="unknown budget signal 'x'"):
        removal_costs(sums, 4, "x")
