import pytest
import torch

from ream_modifiers.engines.selection import plan_budget, select_kept


def test_sparsity_rounds_like_the_reference():
    assert plan_budget(8, 2, sparsity=0.25).kept == 6
    assert plan_budget(128, 8, sparsity=0.3).kept == 128 - 38
    assert plan_budget(8, 2, target=5).dropped == 3


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(sparsity=0.05), "must keep between 1 and 7"),
        (dict(target=8), "must keep between 1 and 7"),
        (dict(target=1), "fewer than the router's top_k=2"),
        (dict(sparsity=0.25, target=6), "exactly one"),
        (dict(target=5, n_group=2, topk_group=1), "split evenly"),
        (dict(target=2, n_group=2, topk_group=2, min_per_group=2), "top 2 experts"),
        (dict(target=4, n_group=4, topk_group=1), "fewer than the router's top_k=2"),
    ],
)
def test_infeasible_budgets_fail_with_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        plan_budget(8, 2, **kwargs)


def test_group_limited_removes_the_same_number_per_group():
    budget = plan_budget(8, 2, sparsity=0.5, n_group=2, topk_group=2)
    scores = torch.tensor([0.1, 0.2, 0.3, 0.4, 5.0, 6.0, 7.0, 8.0])
    # globally the 4 lowest are all in group 0; per group it is 2 and 2
    assert select_kept(scores, budget) == [2, 3, 6, 7]
    assert select_kept(scores, budget, remove="highest") == [0, 1, 4, 5]


def test_ties_drop_the_lower_index_first():
    budget = plan_budget(4, 1, target=2)
    assert select_kept(torch.tensor([1.0, 1.0, 1.0, 2.0]), budget) == [2, 3]
