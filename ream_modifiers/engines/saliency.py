"""
Calibration-based expert scores computed from :class:`RoutedExpertSums`.

One vocabulary, shared by every modifier that ranks or weights experts through a
``saliency`` field. Notation, per MoE layer: X_j is the set of calibration tokens
the model routes to expert j (its actual selection: group limits and score
correction bias included, padding excluded), f_j(x) the expert's output before
any routing weight, and

- g_j(x): the weight the model multiplies f_j(x) by (after top-k
  renormalisation where the model renormalises, and after
  ``routed_scaling_factor``);
- p_j(x): the router's *unrenormalised* score of expert j before selection:
  softmax over all experts of the logits for softmax routers (Qwen3, Mixtral),
  sigmoid of the logit for sigmoid routers (DeepSeek-V3, GLM-4.5, MiniMax-M2),
  without the selection-only correction bias, renormalisation or scaling factor.

Metrics:

- ``reap``: mean over X_j of g_j(x)*||f_j(x)||, the REAP paper's score;
- ``ream``: what the REAM reference code computes (SamsungSAILMontreal/ream,
  ``ream/saliency.py::reap`` fed the gated outputs of ``run_all_experts``):
  p_j(x)^2*||f_j(x)||, averaged over X_j within each calibration batch, then the
  per-batch means averaged over batches (a batch where j is never routed counts
  as 0, so rarely routed experts are discounted further). Kept from the
  reference: the unrenormalised p, its square, the mean of per-batch means. Not
  kept: the reference includes padding tokens, divides by floor(rows/batch) where
  it loops over ceil(rows/batch) chunks (a constant factor per layer: no ranking
  or merge weight changes), and for sigmoid routers re-derives a softmax of the
  raw logits with a plain top-k; here p is the model's own score and X_j the
  model's own selection. The reference's batch is 8 rows; here it is the
  calibration batch the pipeline feeds (``batch_size`` of ``oneshot``);
- ``ream_tokens``: the same p^2*||f|| as one exact mean over all of X_j;
- ``ean``: sum over X_j of ||f_j(x)|| (EAN, as the REAP paper runs it);
  ``ean_mean``: its mean over X_j;
- ``frequency``: |X_j|; ``weighted_frequency``: sum over X_j of g_j(x) (DERN's
  importance up to a per-layer constant).

An expert never routed scores 0 and is the first to go.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Literal

import torch

__all__ = [
    "SALIENCY_METRICS",
    "Saliency",
    "needs_probabilities",
    "saliency",
    "super_expert_mask",
]

Saliency = Literal[
    "reap",
    "ream",
    "ream_tokens",
    "ean",
    "ean_mean",
    "frequency",
    "weighted_frequency",
]


def _per_token(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    # an expert that was never routed scores 0 and goes first
    return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))


SALIENCY_METRICS: dict[str, Callable[[Mapping[str, torch.Tensor]], torch.Tensor]] = {
    "reap": lambda s: _per_token(s["weighted_norm"], s["count"]),
    "ream": lambda s: s["prob_sq_norm_batch_means"] / s["batches"].clamp(min=1),
    "ream_tokens": lambda s: _per_token(s["prob_sq_norm"], s["count"]),
    "ean": lambda s: s["norm"],
    "ean_mean": lambda s: _per_token(s["norm"], s["count"]),
    "frequency": lambda s: s["count"],
    "weighted_frequency": lambda s: s["weight"],
}

# metrics that need p_j(x), the router's unrenormalised score, per routed token
_PROBABILITY_METRICS = frozenset({"ream", "ream_tokens"})


def needs_probabilities(metric: str) -> bool:
    """Whether ``metric`` needs the p^2-weighted sums of :class:`RoutedExpertSums`."""
    return metric in _PROBABILITY_METRICS


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
    if needs_probabilities(metric) and "prob_sq_norm" not in sums:
        raise ValueError(
            f"saliency {metric!r} needs p^2-weighted sums: build RoutedExpertSums "
            "with probabilities=True"
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
