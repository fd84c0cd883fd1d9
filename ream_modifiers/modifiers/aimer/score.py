"""AIMER: a calibration-free expert score from the weights alone."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ream_modifiers.moe.layer import MoELayer

__all__ = ["aimer_score", "aimer_score_experts", "aimer_score_layer"]


def _sums(weight: torch.Tensor, dim: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ|w| and Σw² in fp32 without materialising |w|, w² or an fp32 copy."""
    l1 = torch.linalg.vector_norm(weight, 1, dim=dim, dtype=torch.float32)
    l2 = torch.linalg.vector_norm(weight, 2, dim=dim, dtype=torch.float32)
    return l1, l2.square()


# fp32 elements per block on CPU: the block's fp32 copy (1 MiB) stays in cache
# for the second reduction, so each weight is read from memory once. Per-block
# dispatch dominates smaller blocks (Qwen3-30B-A3B layer, bf16, one thread:
# 64 Ki 0.89 s, 128 Ki 0.62 s, 256 Ki 0.44 s, 512 Ki 0.46 s, 1 Mi 0.93 s, where
# larger copies leave the cache; BENCHMARKS.md "Speed ratios")
_CPU_BLOCK = 1 << 18


def _streamed_sums(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Σ|w| and Σw² of one weight tensor in fp32. On an accelerator two whole-tensor
    reductions (an expert's projection fits in its L2 cache, so the second one
    reads from cache). On CPU, where torch's bf16 norms are slow, block by block:
    convert a cache-sized block to fp32 once and take both sums from it.
    """
    if weight.device.type != "cpu":
        return _sums(weight, dim=None)
    flat = weight.reshape(-1)
    abs_sum = torch.zeros((), dtype=torch.float32)
    sq_sum = torch.zeros((), dtype=torch.float32)
    for block in flat.split(_CPU_BLOCK):
        block = block.float()
        abs_sum += block.abs().sum()
        sq_sum += torch.dot(block, block)
    return abs_sum, sq_sum


def _ratio(abs_sum: torch.Tensor, sq_sum: torch.Tensor, count: int) -> torch.Tensor:
    mean_abs = abs_sum / count
    rms = (sq_sum / count).sqrt()
    return torch.where(rms > 0, mean_abs / rms.clamp(min=1e-30), torch.zeros_like(rms))


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
        l1, sq = _sums(flat, dim=-1)
        abs_sum += l1
        sq_sum += sq
        count += flat.shape[1]
    return _ratio(abs_sum, sq_sum, count)


def aimer_score_experts(experts: Iterable[Iterable[torch.Tensor]]) -> torch.Tensor:
    """
    The same scores, streamed expert by expert from the model's own weight
    tensors: nothing is stacked, each weight is read from memory once (the second
    sum reads it from cache), and results stay on the device until the end.

    :param experts: per expert, its projection weights (any shapes)
    :return: ``[E]`` fp32 scores
    """
    abs_sums, sq_sums, counts = [], [], []
    for weights in experts:
        abs_sum = sq_sum = None
        count = 0
        for weight in weights:
            l1, sq = _streamed_sums(weight)
            abs_sum = l1 if abs_sum is None else abs_sum + l1
            sq_sum = sq if sq_sum is None else sq_sum + sq
            count += weight.numel()
        if abs_sum is None:
            raise ValueError("aimer_score_experts: an expert has no weights")
        abs_sums.append(abs_sum)
        sq_sums.append(sq_sum)
        counts.append(count)
    if not abs_sums:
        raise ValueError("aimer_score_experts needs at least one expert")
    if len(set(counts)) != 1:
        raise ValueError(f"experts differ in size ({sorted(set(counts))} weights)")
    return _ratio(torch.stack(abs_sums), torch.stack(sq_sums), counts[0])


def aimer_score_layer(layer: MoELayer) -> torch.Tensor:
    """:func:`aimer_score_experts` of every routed expert of ``layer``."""
    return aimer_score_experts(
        layer.iter_expert_weights(i) for i in range(layer.num_experts)
    )
