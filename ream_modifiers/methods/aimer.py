"""AIMER: a calibration-free expert score from the weights alone."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["aimer_score"]


def aimer_score(matrices: Sequence[torch.Tensor]) -> torch.Tensor:
    """
    AIMER(e) = mean|w| / sqrt(mean w²) over all of expert e's projection weights
    pooled into one vector (not an average of per-matrix ratios), in fp32.

    :param matrices: per projection, a ``[E, ...]`` stack of the experts' weights
    :return: ``[E]`` scores in ``[1/sqrt(N), 1]``; 0 for an all-zero expert
    """
    if not matrices:
        raise ValueError("aimer_score needs at least one weight matrix")
    experts = matrices[0].shape[0]
    abs_sum = torch.zeros(experts, dtype=torch.float32, device=matrices[0].device)
    sq_sum = torch.zeros_like(abs_sum)
    count = 0
    for weight in matrices:
        flat = weight.reshape(experts, -1)
        abs_sum += flat.abs().sum(dim=-1, dtype=torch.float32)
        sq_sum += flat.float().square().sum(dim=-1)
        count += flat.shape[1]
    mean_abs = abs_sum / count
    rms = (sq_sum / count).sqrt()
    return torch.where(rms > 0, mean_abs / rms.clamp(min=1e-30), torch.zeros_like(rms))
