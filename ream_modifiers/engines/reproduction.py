"""
Does a merge help? Compare, on sampled calibration tokens, how closely the
compressed layer's routed output reproduces the original layer's with each merged
expert and with its centroid left alone.

Pure tensor math: the caller supplies the sampled MoE inputs, the routing before
and after compression, the stacked expert weights and the experts' activation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import TYPE_CHECKING

import torch
from torch.nn import functional as F

if TYPE_CHECKING:
    from ream_modifiers.moe.weights import ExpertWeights

__all__ = [
    "Activation",
    "expert_output",
    "merge_helps",
    "routed_output",
    "weighted_output",
]

#: ``(gate pre-activation or None, up pre-activation) -> neuron activations``
Activation = Callable[[torch.Tensor | None, torch.Tensor], torch.Tensor]


def _projection(weights: ExpertWeights | Mapping, name: str, expert: int | None):
    tensor = (
        weights.get(name) if isinstance(weights, Mapping) else getattr(weights, name)
    )
    if tensor is None or expert is None:
        return tensor
    return tensor[expert]


def expert_output(
    weights: ExpertWeights | Mapping[str, torch.Tensor | None],
    tokens: torch.Tensor,
    activate: Activation,
    expert: int | None = None,
) -> torch.Tensor:
    """
    f(x) of one expert on ``[T, H]`` tokens, in the weights' dtype.

    :param weights: stacked weights (with ``expert``) or one expert's projections
        (``merge_group``'s output, ``expert=None``)
    """

    def linear(name: str) -> torch.Tensor | None:
        weight = _projection(weights, name, expert)
        if weight is None:
            return None
        return F.linear(tokens, weight, _projection(weights, f"{name}_bias", expert))

    hidden = activate(linear("gate"), linear("up"))
    down = _projection(weights, "down", expert)
    return F.linear(hidden, down, _projection(weights, "down_bias", expert))


def weighted_output(
    output_of: Callable[[torch.Tensor], torch.Tensor],
    tokens: torch.Tensor,
    weights: torch.Tensor,
    input_weighted: bool = False,
) -> torch.Tensor:
    """
    One expert's fp32 contribution on ``[t, H]`` tokens with ``[t, 1]`` routing
    weights: ``w * f(x)``, or ``f(w x)`` where the router scales the expert's
    input (Llama-4).
    """
    if input_weighted:
        return output_of(tokens * weights.to(tokens.dtype)).float()
    return output_of(tokens).float() * weights.float()


def routed_output(
    tokens: torch.Tensor,
    index: torch.Tensor,
    routing_weights: torch.Tensor,
    output_of: Callable[[int, torch.Tensor], torch.Tensor],
    input_weighted: bool = False,
) -> torch.Tensor:
    """
    ``[T, H]`` fp32 sum over each token's routed experts of their contributions
    (:func:`weighted_output`).

    :param index: ``[T, k]`` expert ids
    :param routing_weights: ``[T, k]`` the weights the model applies
    :param output_of: ``(expert id, [t, H] tokens) -> [t, H]`` outputs
    :param input_weighted: whether the weights scale the experts' inputs
    """
    total = torch.zeros(tokens.shape, dtype=torch.float32, device=tokens.device)
    for expert in torch.unique(index).tolist():
        token, slot = (index == expert).nonzero(as_tuple=True)
        out = weighted_output(
            partial(output_of, expert),
            tokens[token],
            routing_weights[token, slot, None],
            input_weighted,
        )
        total.index_add_(0, token, out)
    return total


@torch.no_grad()
def merge_helps(
    tokens: torch.Tensor,
    original: tuple[torch.Tensor, torch.Tensor],
    compressed: tuple[torch.Tensor, torch.Tensor],
    kept: Sequence[int],
    weights: ExpertWeights,
    merged: Mapping[int, Mapping[str, torch.Tensor | None]],
    activate: Activation,
    input_weighted: bool = False,
) -> dict[int, dict[str, float]]:
    """
    For every merged centroid, the squared error of the compressed layer's routed
    output against the original's, summed over the sampled tokens the centroid
    serves after compression, with the merged expert and with the centroid alone.
    Centroids change disjoint terms of the output and routing does not depend on
    expert weights, so each centroid's choice is independent of the others.

    :param tokens: ``[T, H]`` sampled MoE inputs
    :param original: ``(index, weights)`` of the original routing of ``tokens``
    :param compressed: ``(index into kept, weights)`` after compression
    :param kept: original ids of the kept experts, in their new order
    :param weights: stacked weights of every original expert
    :param merged: ``{centroid id: merged projections}``
    :param activate: the experts' activation
    :param input_weighted: whether the routing weights scale the experts'
        inputs (Llama-4) rather than their outputs
    :return: ``{centroid: {"merged": error, "centroid": error}}``
    """

    def original_expert(expert: int, x: torch.Tensor) -> torch.Tensor:
        return expert_output(weights, x, activate, expert)

    target = routed_output(tokens, *original, original_expert, input_weighted)
    index, routing_weights = compressed
    kept_ids = torch.as_tensor(list(kept), device=index.device)[index]
    pruned = routed_output(
        tokens, kept_ids, routing_weights, original_expert, input_weighted
    )
    # [centroids, 2] on the device, read back once after the loop
    sums = torch.zeros(len(merged), 2, dtype=torch.float64, device=tokens.device)
    for row, (centroid, projections) in enumerate(merged.items()):
        token, slot = (kept_ids == centroid).nonzero(as_tuple=True)
        x, gate = tokens[token], routing_weights[token, slot, None]
        if input_weighted:
            x = x * gate.to(x.dtype)
        own = expert_output(weights, x, activate, centroid).float()
        new = expert_output(projections, x, activate).float()
        change = new - own if input_weighted else gate.float() * (new - own)
        alone = pruned[token] - target[token]
        with_merge = alone + change
        sums[row, 0] = with_merge.double().square().sum()
        sums[row, 1] = alone.double().square().sum()
    values = sums.tolist()
    return {
        centroid: {"merged": merged_error, "centroid": alone_error}
        for centroid, (merged_error, alone_error) in zip(merged, values, strict=True)
    }
