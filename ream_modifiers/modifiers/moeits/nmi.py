"""
MoEITS: redundancy between experts measured as the normalised mutual information
(NMI) between their weight matrices, and greedy removal of redundant experts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

__all__ = ["quantize", "nmi_matrix", "layer_nmi", "greedy_removal", "iqr_threshold"]


def quantize(stack: torch.Tensor, bins: int) -> torch.Tensor:
    """
    ``[E, n]`` integer bin ids in ``[0, bins)``: each expert's flattened weights
    binned uniformly over that expert's own range (as numpy histograms each
    marginal over its own range).
    """
    flat = stack.reshape(stack.shape[0], -1).float()
    low = flat.amin(dim=-1, keepdim=True)
    span = (flat.amax(dim=-1, keepdim=True) - low).clamp(min=1e-30)
    # int32 ids: half the memory traffic of int64 in the joint bincounts
    return ((flat - low) / span * bins).to(torch.int32).clamp_(0, bins - 1)


def _entropy(counts: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of each row of histogram counts."""
    p = counts.double() / counts.sum(dim=-1, keepdim=True).clamp(min=1)
    return -(p * torch.log(p.clamp(min=1e-300))).sum(dim=-1)


@torch.no_grad()
def nmi_matrix(stack: torch.Tensor, bins: int = 64, block: int = 8) -> torch.Tensor:
    """
    ``[E, E]`` NMI(W_i, W_j) = I / sqrt(H_i H_j), I = H_i + H_j - H_ij, between
    the element-paired weights of every pair of experts, with histogram plug-in
    estimates (``bins`` per marginal, ``bins^2`` joint cells).

    Vectorised on the weights' device: for each expert i the joint histograms
    against a block of experts are one ``bincount``. Time O(E^2 * n), memory
    O(block * n) integers for n weights per expert.
    """
    codes = quantize(stack, bins)
    experts, n = codes.shape
    marginal = torch.stack([torch.bincount(c, minlength=bins) for c in codes])
    entropy = _entropy(marginal)
    nmi = torch.zeros(experts, experts, dtype=torch.float64, device=codes.device)
    for i in range(experts):
        for lo in range(i, experts, block):
            other = codes[lo : lo + block]
            offsets = torch.arange(
                other.shape[0], dtype=torch.int32, device=codes.device
            ) * (bins * bins)
            joint = (codes[i] * bins + other + offsets.unsqueeze(-1)).reshape(-1)
            counts = torch.bincount(joint, minlength=other.shape[0] * bins * bins)
            h_joint = _entropy(counts.reshape(other.shape[0], bins * bins))
            h_other = entropy[lo : lo + other.shape[0]]
            mutual = entropy[i] + h_other - h_joint
            value = mutual / (entropy[i] * h_other).sqrt().clamp(min=1e-30)
            nmi[i, lo : lo + other.shape[0]] = value
    # the loop fills the upper triangle; mirror it (spec M6: symmetric matrix)
    return torch.triu(nmi) + torch.triu(nmi, diagonal=1).T


def layer_nmi(
    matrices: Mapping[str, torch.Tensor],
    projection_weights: Mapping[str, float],
    bins: int = 64,
) -> torch.Tensor:
    """
    M = sum_p alpha_p NMI(W_p^i, W_p^j), symmetric with a zero diagonal.

    :param matrices: ``{projection: [E, ...] stack}``
    :param projection_weights: ``{projection: alpha}``; projections absent from
        ``matrices`` (no gate) are skipped and the rest renormalised
    """
    present = {p: w for p, w in projection_weights.items() if p in matrices and w}
    if not present:
        raise ValueError(f"no projection of {sorted(matrices)} has a weight")
    total = sum(present.values())
    combined = None
    for name, alpha in present.items():
        term = nmi_matrix(matrices[name], bins) * (alpha / total)
        combined = term if combined is None else combined + term
    combined.fill_diagonal_(0.0)
    return combined


def iqr_threshold(matrix: torch.Tensor, lambda_iqr: float) -> float:
    """tau = mean(M) + lambda * IQR(M) over all E^2 entries (zero diagonal included)."""
    flat = matrix.double().flatten().cpu()
    q1, q3 = torch.quantile(flat, torch.tensor([0.25, 0.75], dtype=torch.float64))
    return float(flat.mean() + lambda_iqr * (q3 - q1))


def greedy_removal(
    matrix: torch.Tensor,
    members: Sequence[int],
    keep: int | None = None,
    threshold: float | None = None,
    min_keep: int = 1,
) -> list[int]:
    """
    Remove experts from ``members`` one at a time: take the pair with the highest
    remaining M (first in row-major order on ties) and remove whichever of the two
    has the higher mean M to the remaining experts (the second on a tie). Stops at
    ``keep`` experts, or when no pair exceeds ``threshold``, never below
    ``min_keep``.

    :return: the kept experts, ascending
    """
    matrix = matrix.double().cpu()
    alive = list(members)
    target = keep if keep is not None else min_keep
    while len(alive) > max(target, min_keep):
        sub = matrix[alive][:, alive]
        best = int(torch.argmax(sub))
        if (
            threshold is not None
            and keep is None
            and float(sub.flatten()[best]) <= threshold
        ):
            break
        a, b = divmod(best, len(alive))
        means = sub.mean(dim=1)
        victim = a if float(means[a]) > float(means[b]) else b
        alive.pop(victim)
    return sorted(alive)
