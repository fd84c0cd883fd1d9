"""Calibration-based expert scores computed from :class:`RoutedExpertSums`."""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["SALIENCY_METRICS", "saliency", "super_expert_mask"]


def _per_token(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    # an expert that was never routed scores 0 and goes first
    return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))


SALIENCY_METRICS = {
    # REAP: S_j = mean over routed tokens of g_j(x) * ||f_j(x)||
    "reap": lambda s: _per_token(s["weighted_norm"], s["count"]),
    # EAN (sum): S_j = sum over routed tokens of ||f_j(x)||
    "ean": lambda s: s["norm"],
    "ean_mean": lambda s: _per_token(s["norm"], s["count"]),
    # frequency: S_j = |X_j|
    "frequency": lambda s: s["count"],
    "weighted_frequency": lambda s: s["weight"],
}


def saliency(sums: Mapping[str, torch.Tensor], metric: str = "reap") -> torch.Tensor:
    """
    Per-expert saliency (higher = more important) from routed-token sums.

    :param sums: the accumulators of :class:`RoutedExpertSums`
    :param metric: one of :data:`SALIENCY_METRICS`
    """
    if metric not in SALIENCY_METRICS:
        raise ValueError(
            f"unknown saliency {metric!r}; choose from {sorted(SALIENCY_METRICS)}"
        )
    return SALIENCY_METRICS[metric](sums).double()


def super_expert_mask(
    max_activation: torch.Tensor,
    seen_max_activations: torch.Tensor,
    percentile: float = 99.5,
    global_fraction: float = 0.1,
) -> torch.Tensor:
    """
    REAP's super-expert rule: an expert is protected when its largest output
    activation exceeds both the ``percentile`` of all experts' largest activations
    and ``global_fraction`` of the overall largest one.

    :param max_activation: ``[E]`` this layer's per-expert maxima
    :param seen_max_activations: maxima of every expert considered so far
        (this layer included)
    """
    pool = seen_max_activations.double().flatten()
    threshold = torch.maximum(
        torch.quantile(pool, percentile / 100.0), pool.max() * global_fraction
    )
    return max_activation.double() > threshold
