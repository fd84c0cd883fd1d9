"""Merging a group of experts into one: permutation and weighted averaging."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ream_modifiers.moe.weights import ExpertWeights

__all__ = ["PROJECTIONS", "merge_group", "merge_coefficients"]

PROJECTIONS = ("gate", "up", "down", "gate_bias", "up_bias", "down_bias")


def merge_coefficients(scores: torch.Tensor, group: Sequence[int]) -> list[float]:
    """
    Normalised merge weights of ``group`` from per-expert scores. A zero score is
    raised to min(0.5, smallest positive score) first, as the reference does, so
    that an expert that was never routed still enters the average a little.
    """
    values = scores.double().cpu()[list(group)]
    positive = scores.double().cpu()
    positive = positive[positive > 0]
    floor = min(0.5, float(positive.min())) if positive.numel() else 1.0
    values = torch.where(values > 0, values, torch.full_like(values, floor))
    return (values / values.sum()).tolist()


def _permuted(name: str, tensor: torch.Tensor, perm: torch.Tensor | None):
    if perm is None:
        return tensor
    if name == "down":  # [H, D]: neurons are columns
        return tensor[:, perm]
    if name in ("gate", "up", "gate_bias", "up_bias"):  # neurons are rows / entries
        return tensor[perm]
    return tensor  # down_bias lives in the output space


@torch.no_grad()
def merge_group(
    weights: ExpertWeights,
    group: Sequence[int],
    coefficients: Sequence[float],
    perms: Sequence[Sequence[int] | None] | None = None,
) -> dict[str, torch.Tensor]:
    """
    theta = sum_i c_i * P_i(theta_i) over the experts of ``group`` (stacked in
    ``weights``), accumulated in fp32 and returned in the weights' dtype.

    :param perms: per group member, the neuron permutation aligning it to the
        first member (None: unpermuted); default none at all
    :return: ``{projection: tensor}`` for every projection the family has
    """
    perms = perms or [None] * len(group)
    merged: dict[str, torch.Tensor] = {}
    for name in PROJECTIONS:
        stack = getattr(weights, name)
        if stack is None:
            continue
        total = torch.zeros_like(stack[0], dtype=torch.float32)
        for expert, coefficient, perm in zip(group, coefficients, perms, strict=True):
            index = None if perm is None else torch.as_tensor(perm, device=stack.device)
            total += coefficient * _permuted(name, stack[expert], index).float()
        merged[name] = total.to(stack.dtype)
    return merged
