"""
Neuron alignment: describing each intermediate neuron of an expert, and matching
a member's neurons to a centroid's with the Hungarian algorithm.

An expert's function is unchanged when its intermediate neurons are permuted
(gate and up rows, down columns together), so a member can be aligned to its
centroid before averaging without changing what it computes.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from ream_modifiers.moe.weights import ExpertWeights

__all__ = [
    "neuron_rows",
    "weight_pca",
    "weight_descriptors",
    "activation_descriptor",
    "activation_descriptors",
    "match_neurons",
]


def neuron_rows(weights: ExpertWeights, expert: int) -> torch.Tensor:
    """``[D, 3H]``: neuron d as [W_gate[d, :] | W_up[d, :] | W_down[:, d]]."""
    parts = [w[expert] for w in (weights.gate, weights.up) if w is not None]
    parts.append(weights.down[expert].T)
    return torch.cat(parts, dim=-1)


# neuron rows per fp32 Gram product in weight_pca (64 MiB at 3H = 4096)
_GRAM_ROWS = 4096


def _unit(rows: torch.Tensor) -> torch.Tensor:
    return rows / rows.norm(dim=-1, keepdim=True).clamp(min=1e-12)


@torch.no_grad()
def weight_pca(weights: ExpertWeights, dim: int = 64) -> Callable[[int], torch.Tensor]:
    """
    REAM's PCA weight descriptor, as a function of the expert.

    All N*D neuron rows of the layer are L2-normalised and centred, projected on
    their top-``dim`` principal directions (an exact PCA through the streamed
    ``3H x 3H`` covariance, rather than the reference's randomised low-rank PCA
    of the full N*D x 3H matrix, which needs no more memory than one expert), and
    L2-normalised again. The projection ``(rows - mean) @ V`` equals ``U * S`` of
    the SVD, i.e. the components scaled by their singular values. The principal
    directions are computed here, once; the returned function projects one
    expert's neurons when called, so descriptors need not all be held at once.

    :return: ``expert -> [D, dim] fp32``
    """
    num_experts = weights.down.shape[0]
    neurons, width = _neuron_shape(weights)
    device = weights.down.device
    total = torch.zeros(width, dtype=torch.float64, device=device)
    second = torch.zeros(width, width, dtype=torch.float64, device=device)
    # the Gram matrix in fp32 products of about _GRAM_ROWS rows, summed in fp64:
    # an fp64 product per expert ran at half the fp32 rate or less (CPUs and
    # GPUs alike) and was REAM's largest decision cost (BENCHMARKS.md)
    # (in place throughout: at H = 2048 one fp64 3H x 3H matrix is 300 MB, and
    # out-of-place steps held several at once, more than the layer's experts)
    chunk = min(num_experts, max(1, _GRAM_ROWS // neurons))
    rows = torch.empty(chunk * neurons, width, dtype=torch.float32, device=device)
    for start in range(0, num_experts, chunk):
        stop = min(start + chunk, num_experts)
        block = rows[: (stop - start) * neurons]
        for position, expert in enumerate(range(start, stop)):
            block[position * neurons : (position + 1) * neurons] = _unit(
                neuron_rows(weights, expert).float()
            )
        total += block.sum(0, dtype=torch.float64)
        second += block.T @ block  # the fp32 product, accumulated in fp64
    del rows, block
    count = num_experts * neurons
    mean = total / count
    covariance = second.div_(count).sub_(torch.outer(mean, mean))
    vectors = torch.linalg.eigh(covariance).eigenvectors  # ascending eigenvalues
    del covariance, second
    basis = vectors[:, -min(dim, width) :].flip(-1).float()
    mean = mean.float()

    @torch.no_grad()
    def describe(expert: int) -> torch.Tensor:
        return _unit((_unit(neuron_rows(weights, expert).float()) - mean) @ basis)

    return describe


def _neuron_shape(weights: ExpertWeights) -> tuple[int, int]:
    """``(D, 3H)``: the shape of one expert's :func:`neuron_rows`."""
    hidden, neurons = weights.down.shape[1:]
    return neurons, hidden * len(weights.matrices())


def weight_descriptors(
    weights: ExpertWeights, experts: list[int], dim: int = 64
) -> dict[int, torch.Tensor]:
    """``{expert: [D, dim] fp32}``: :func:`weight_pca`'s descriptors of ``experts``."""
    describe = weight_pca(weights, dim)
    return {e: describe(e) for e in experts}


def activation_descriptor(samples: torch.Tensor, expert: int) -> torch.Tensor:
    """``[D, S]``: each neuron's sampled activations, L2-normalised."""
    return _unit(samples[expert].float().T)


def activation_descriptors(samples: torch.Tensor, experts: list[int]):
    """``{expert: [D, S]}``: :func:`activation_descriptor` of ``experts``."""
    return {e: activation_descriptor(samples, e) for e in experts}


@torch.no_grad()
def match_neurons(
    centroid: int,
    members: list[int],
    descriptors: list[dict[int, torch.Tensor]],
    squared: bool = False,
) -> list[list[int]]:
    """
    Hungarian matching of each member's neurons to the centroid's.

    The cost of pairing centroid neuron a with member neuron b is the sum over
    ``descriptors`` of the Euclidean distance between their descriptors (squared
    distances with ``squared=True``, i.e. M-SMoE's weight matching). Cost
    matrices of the whole group are built on the device and moved to the host
    once for scipy.

    :return: per member, ``perm`` such that member neuron ``perm[a]`` goes to
        position ``a``
    """
    if not members:
        return []
    costs = []
    for m in members:
        cost = None
        for table in descriptors:
            term = torch.cdist(table[centroid].float(), table[m].float())
            term = term.square() if squared else term
            cost = term if cost is None else cost + term
        costs.append(cost)
    host = torch.stack(costs).cpu().double().numpy()
    perms = []
    for matrix in host:
        rows, cols = linear_sum_assignment(matrix)
        perm = np.empty_like(cols)
        perm[rows] = cols
        perms.append(perm.tolist())
    return perms
