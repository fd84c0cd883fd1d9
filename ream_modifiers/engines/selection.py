"""How many experts to keep per layer, and which ones."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

__all__ = ["ExpertBudget", "fewest_kept", "plan_budget", "select_kept"]


@dataclass(frozen=True)
class ExpertBudget:
    """
    The per-layer expert budget, identical for every layer (vLLM needs one count).

    :param num_experts: experts per layer before
    :param kept: experts per layer after
    :param n_group: expert groups of a group-limited router, else None
    """

    num_experts: int
    kept: int
    n_group: int | None = None

    @property
    def dropped(self) -> int:
        return self.num_experts - self.kept

    @property
    def kept_per_group(self) -> int | None:
        return None if self.n_group is None else self.kept // self.n_group

    @property
    def kept_per_router_group(self) -> int:
        """Experts kept in each router group (all of them without groups)."""
        return self.kept // (self.n_group or 1)


def plan_budget(
    num_experts: int,
    top_k: int,
    *,
    target: int | None = None,
    sparsity: float | None = None,
    n_group: int | None = None,
    topk_group: int | None = None,
    min_per_group: int = 1,
) -> ExpertBudget:
    """
    Resolve ``target`` (experts to keep) or ``sparsity`` (share to remove) into a
    feasible uniform budget, or raise a ValueError that says what to change.

    With a group-limited router the same number is removed from every group
    (group membership is positional, so anything else changes routing), and a
    token must still reach ``top_k`` experts inside its ``topk_group`` groups.

    :param min_per_group: experts each group needs (2 where the group score is the
        sum of its top-2 scores)
    """
    if (target is None) == (sparsity is None):
        raise ValueError("give exactly one of num_experts and sparsity")
    if sparsity is not None:
        # same rounding as REAP's reference code and llm-compressor
        dropped = int(num_experts * sparsity)
        if n_group is not None:
            dropped = round(dropped / n_group) * n_group
        kept = num_experts - dropped
    else:
        kept = target
    if not 0 < kept < num_experts:
        what = f"num_experts={target}" if target is not None else f"sparsity={sparsity}"
        raise ValueError(
            f"{what} keeps {kept} of {num_experts} experts per layer; it must keep "
            f"between 1 and {num_experts - 1}. "
            + (
                "Raise the sparsity."
                if sparsity is not None and kept >= num_experts
                else "Choose a value that removes at least one expert."
            )
        )
    reachable = kept
    if n_group is not None:
        if kept % n_group:
            raise ValueError(
                f"keeping {kept} experts cannot be split evenly over the router's "
                f"n_group={n_group} expert groups; choose a multiple of {n_group} "
                f"(e.g. {max(n_group, kept // n_group * n_group)})"
            )
        per_group = kept // n_group
        if per_group < min_per_group:
            raise ValueError(
                f"keeping {kept} experts leaves {per_group} per group, but this "
                f"router scores each group by its top {min_per_group} experts; keep at "
                f"least {min_per_group * n_group}"
            )
        reachable = (topk_group or n_group) * per_group
    if top_k > reachable:
        raise ValueError(
            f"keeping {kept} of {num_experts} experts per layer leaves {reachable} "
            f"reachable per token, fewer than the router's top_k={top_k}; keep at "
            "least top_k reachable experts (lower the sparsity or raise num_experts)"
        )
    return ExpertBudget(num_experts=num_experts, kept=kept, n_group=n_group)


def fewest_kept(
    num_experts: int,
    top_k: int,
    *,
    n_group: int | None = None,
    topk_group: int | None = None,
    min_per_group: int = 1,
) -> int:
    """The fewest experts a layer may keep: the smallest count
    :func:`plan_budget` accepts (top-k reachable, groups filled evenly)."""
    for kept in range(1, num_experts):
        try:
            plan_budget(
                num_experts,
                top_k,
                target=kept,
                n_group=n_group,
                topk_group=topk_group,
                min_per_group=min_per_group,
            )
        except ValueError:
            continue
        return kept
    return num_experts


def select_kept(
    scores: torch.Tensor,
    budget: ExpertBudget,
    remove: Literal["lowest", "highest"] = "lowest",
) -> list[int]:
    """
    Indices of the experts to keep, ascending. Removes the ``budget.dropped``
    lowest (or highest) scores, the same number in every group when the router is
    group-limited. Ties go to the lower index first (stable sort).
    """
    scores = scores.detach().double().cpu()
    if scores.numel() != budget.num_experts:
        raise ValueError(f"{scores.numel()} scores for {budget.num_experts} experts")
    order_key = scores if remove == "lowest" else -scores
    groups = budget.n_group or 1
    size = budget.num_experts // groups
    drop_per_group = budget.dropped // groups
    kept: list[int] = []
    for g in range(groups):
        lo = g * size
        order = torch.argsort(order_key[lo : lo + size], stable=True)
        dropped = {lo + int(i) for i in order[:drop_per_group]}
        kept.extend(i for i in range(lo, lo + size) if i not in dropped)
    return kept
