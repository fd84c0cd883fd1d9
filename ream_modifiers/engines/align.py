"""
Neuron alignment: describing each intermediate neuron of an expert, and matching
a member's neurons to a centroid's with the Hungarian algorithm.

An expert's function is unchanged when its intermediate neurons are permuted
(gate and up rows, down columns together), so a member can be aligned to its
centroid before averaging without changing what it computes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from ream_modifiers.moe.weights import ExpertWeights

__all__ = [
    "PCA_METHODS",
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


# neuron rows per fp32 product in weight_pca (64 MiB at 3H = 4096)
_GRAM_ROWS = 4096
# the randomised PCA: directions sampled beyond `dim`, and power iterations
# (each one pass over the layer's weights). Where the spectrum has a gap after
# `dim` it finds the exact directions (tests/engines); on the fixture's
# trained layers the 64 directions keep 98.5% of the exact ones' variance, on
# random Qwen3-30B-A3B-width layers (a flat spectrum) 88% (BENCHMARKS.md)
_OVERSAMPLE = 16
_POWER_ITERATIONS = 4

PCA_METHODS = ("lowrank", "exact")


def _unit(rows: torch.Tensor) -> torch.Tensor:
    return rows / rows.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def _unit_row_blocks(weights: ExpertWeights) -> Iterator[torch.Tensor]:
    """
    The layer's L2-normalised neuron rows in fp32, about ``_GRAM_ROWS`` at a
    time, written into one reused buffer (a block is valid until the next).
    """
    num_experts = weights.down.shape[0]
    neurons, width = _neuron_shape(weights)
    chunk = min(num_experts, max(1, _GRAM_ROWS // neurons))
    rows = torch.empty(
        chunk * neurons, width, dtype=torch.float32, device=weights.down.device
    )
    for start in range(0, num_experts, chunk):
        stop = min(start + chunk, num_experts)
        block = rows[: (stop - start) * neurons]
        for position, expert in enumerate(range(start, stop)):
            block[position * neurons : (position + 1) * neurons] = _unit(
                neuron_rows(weights, expert).float()
            )
        yield block


def _exact_directions(
    weights: ExpertWeights, dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean [3H] fp64, top-dim directions [3H, dim] fp64)`` from the eigen-
    decomposition of the streamed ``3H x 3H`` covariance."""
    neurons, width = _neuron_shape(weights)
    device = weights.down.device
    total = torch.zeros(width, dtype=torch.float64, device=device)
    second = torch.zeros(width, width, dtype=torch.float64, device=device)
    # fp32 products of about _GRAM_ROWS rows, summed in fp64: an fp64 product
    # per expert ran at half the fp32 rate or less (CPUs and GPUs alike); in
    # place throughout (one fp64 3H x 3H matrix is 300 MB at H = 2048)
    for block in _unit_row_blocks(weights):
        total += block.sum(0, dtype=torch.float64)
        second += block.T @ block
    count = weights.down.shape[0] * neurons
    mean = total / count
    covariance = second.div_(count).sub_(torch.outer(mean, mean))
    vectors = torch.linalg.eigh(covariance).eigenvectors  # ascending eigenvalues
    return mean, vectors[:, -min(dim, width) :].flip(-1)


def _lowrank_directions(
    weights: ExpertWeights, dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    The same by randomised subspace iteration on the covariance, which is never
    formed: each product ``C Q`` is one pass over the neuron rows
    (``sum X_b^T (X_b Q) / n - mean (mean^T Q)``), ``2 * rows * 3H * k`` flops
    instead of the exact path's ``rows * (3H)^2`` Gram and ``(3H)^3`` eigen-
    decomposition, and ``3H x k`` memory instead of ``(3H)^2``.
    """
    neurons, width = _neuron_shape(weights)
    device = weights.down.device
    count = weights.down.shape[0] * neurons
    k = min(dim + _OVERSAMPLE, width)
    generator = torch.Generator(device=device).manual_seed(0)
    basis = torch.randn(width, k, generator=generator, device=device)
    mean: torch.Tensor | None = None

    def covariance_times(basis: torch.Tensor) -> torch.Tensor:
        nonlocal mean
        product = torch.zeros(width, k, dtype=torch.float64, device=device)
        total = torch.zeros(width, dtype=torch.float64, device=device)
        for block in _unit_row_blocks(weights):
            product += block.T @ (block @ basis)
            if mean is None:
                total += block.sum(0, dtype=torch.float64)
        if mean is None:
            mean = total / count
        product.div_(count).sub_(torch.outer(mean, mean @ basis.double()))
        return product

    basis = torch.linalg.qr(basis).Q
    for _ in range(_POWER_ITERATIONS):
        basis = torch.linalg.qr(covariance_times(basis).float()).Q
    # Rayleigh-Ritz in the sampled subspace
    projected = basis.double().T @ covariance_times(basis)
    vectors = torch.linalg.eigh((projected + projected.T) / 2).eigenvectors
    directions = basis.double() @ vectors[:, -min(dim, k) :].flip(-1)
    return mean, directions


@torch.no_grad()
def weight_pca(
    weights: ExpertWeights, dim: int = 64, method: str = "lowrank"
) -> Callable[[int], torch.Tensor]:
    """
    REAM's PCA weight descriptor, as a function of the expert.

    All N*D neuron rows of the layer are L2-normalised and centred, projected on
    their top-``dim`` principal directions and L2-normalised again. The
    projection ``(rows - mean) @ V`` equals ``U * S`` of the SVD, i.e. the
    components scaled by their singular values (the reference scales once more,
    ``U * S^2``; no measurable effect, ``ream_oracle.md``). The directions come
    from a randomised subspace iteration on the streamed covariance
    (``lowrank``, as the reference's ``torch.pca_lowrank``, here with 16
    oversampled directions and 4 power iterations) or an exact
    eigendecomposition of it (``exact``: ``(3H)^2`` memory and ``(3H)^3`` time,
    4.5x the reference's whole run at Qwen3-30B-A3B's width on CPU). Either
    way no more than one block of rows is held; the directions are computed
    here, once, and the returned function projects one expert's neurons when
    called, so descriptors need not all be held at once.

    :param method: ``lowrank`` or ``exact``
    :return: ``expert -> [D, dim] fp32``
    """
    if method not in PCA_METHODS:
        raise ValueError(f"weight_pca: method must be one of {PCA_METHODS}")
    _, width = _neuron_shape(weights)
    if method == "exact" or dim + _OVERSAMPLE >= width:
        mean, directions = _exact_directions(weights, dim)
    else:
        mean, directions = _lowrank_directions(weights, dim)
    basis, mean = directions.float(), mean.float()

    @torch.no_grad()
    def describe(expert: int) -> torch.Tensor:
        return _unit((_unit(neuron_rows(weights, expert).float()) - mean) @ basis)

    return describe


def _neuron_shape(weights: ExpertWeights) -> tuple[int, int]:
    """``(D, 3H)``: the shape of one expert's :func:`neuron_rows`."""
    hidden, neurons = weights.down.shape[1:]
    return neurons, hidden * len(weights.matrices())


def weight_descriptors(
    weights: ExpertWeights, experts: list[int], dim: int = 64, method: str = "lowrank"
) -> dict[int, torch.Tensor]:
    """``{expert: [D, dim] fp32}``: :func:`weight_pca`'s descriptors of ``experts``."""
    describe = weight_pca(weights, dim, method)
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
