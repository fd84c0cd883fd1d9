"""
Per-layer expert budgets: how many experts each layer keeps when one global
ratio is spread unevenly (issue 17 §2).

Layers differ in how much removing an expert costs them: in one layer the
lowest experts carry almost none of the routed output, in another every expert
is busy. Given a cost per expert per layer, :func:`allocate_kept` removes, over
the whole model, the cheapest experts first until the global count is met,
within each layer's limits (top-k reachable, the same count in every router
group). Within a layer the cost of the r-th removal never falls as r grows, so
this greedy choice minimises the summed cost for the total removed.

The cost signals (:data:`SIGNALS`) come from calibration statistics recorded
for every layer before any is reduced (``from_statistics``), so the allocation
sees the whole model at once.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import torch

__all__ = ["SIGNALS", "allocate_kept", "removal_costs"]

# budget name -> what one expert's removal costs its layer
SIGNALS = {
    # its share of the layer's routed output mass, sum of g_j(x)·‖f_j(x)‖ over
    # the routed tokens (REAP's numerator): every layer weighs the same
    "saliency_fraction": "share of the layer's routed output mass",
    # the mass itself per calibration token: layers with larger expert outputs
    # weigh more
    "saliency_mass": "routed output mass per calibration token",
}


def removal_costs(
    weighted_norm: torch.Tensor, tokens: int, signal: str
) -> torch.Tensor:
    """
    One layer's per-expert removal costs (fp64).

    :param weighted_norm: ``[E]`` sums of g·‖f‖ over each expert's routed tokens
    :param tokens: calibration tokens the layer saw
    :param signal: a key of :data:`SIGNALS`
    """
    mass = weighted_norm.double()
    if signal == "saliency_fraction":
        return mass / mass.sum().clamp(min=1e-300)
    if signal == "saliency_mass":
        return mass / max(tokens, 1)
    raise ValueError(f"unknown budget signal {signal!r}; known: {sorted(SIGNALS)}")


def allocate_kept(
    costs: Sequence[torch.Tensor],
    total_kept: int,
    *,
    min_kept: Sequence[int],
    groups: int = 1,
) -> list[int]:
    """
    Experts to keep per layer, ``total_kept`` in all, cheapest removals first.

    :param costs: per layer, ``[E_l]`` removal costs of its experts
    :param total_kept: experts kept over all layers
    :param min_kept: per layer, the fewest experts it may keep
    :param groups: router groups per layer: removals go one per group at a time
        (group membership is positional), costing the groups' next cheapest
    :raises ValueError: if ``total_kept`` cannot be met within the limits
    """
    sizes = [int(c.numel()) for c in costs]
    removable = [size - low for size, low in zip(sizes, min_kept, strict=True)]
    to_remove = sum(sizes) - total_kept
    if to_remove % groups or any(r % groups for r in removable):
        raise ValueError(
            f"removals must come in steps of {groups} (one per router group)"
        )
    if not 0 <= to_remove <= sum(removable):
        raise ValueError(
            f"cannot keep {total_kept} experts over {len(sizes)} layers of "
            f"{sizes} experts when each must keep at least {list(min_kept)}"
        )
    # per layer, the cost of each successive step (one expert per group)
    steps = []
    for layer_costs, size in zip(costs, sizes, strict=True):
        per_group = layer_costs.double().cpu().reshape(groups, size // groups)
        steps.append(per_group.sort(dim=1).values.sum(dim=0).tolist())
    removed = [0] * len(sizes)
    frontier = [(steps[i][0], i) for i in range(len(sizes)) if removable[i] > 0]
    heapq.heapify(frontier)
    for _ in range(to_remove // groups):
        _, layer = heapq.heappop(frontier)
        removed[layer] += groups
        if removed[layer] < removable[layer]:
            step = removed[layer] // groups
            heapq.heappush(frontier, (steps[layer][step], layer))
    return [size - r for size, r in zip(sizes, removed, strict=True)]
