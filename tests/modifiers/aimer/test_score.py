import math

import pytest
import torch

from ream_modifiers.modifiers.aimer.score import aimer_score, aimer_score_experts


def test_aimer_pools_all_projections_into_one_ratio():
    gate = torch.tensor([[[1.0, -1.0]], [[0.0, 0.0]]])  # [E=2, 1, 2]
    up = torch.tensor([[[2.0, 0.0]], [[3.0, 0.0]]])
    down = torch.tensor([[[0.0], [-2.0]], [[0.0], [0.0]]])  # [E, 2, 1]
    scores = aimer_score([gate, up, down])
    # expert 0: w = [1,-1,2,0,0,-2] -> mean|w| = 1, rms = sqrt(10/6)
    assert scores[0].item() == pytest.approx(1.0 / math.sqrt(10 / 6))
    # expert 1: w = [0,0,3,0,0,0] -> 0.5 / sqrt(1.5) = 1/sqrt(6), the minimum 1/sqrt(N)
    assert scores[1].item() == pytest.approx(1 / math.sqrt(6))


def test_aimer_is_scale_invariant_bounded_and_zero_for_empty_experts():
    weights = torch.randn(4, 16, 8)
    weights[3] = 0.0
    scores = aimer_score([weights])
    torch.testing.assert_close(aimer_score([weights * 7.5]), scores)
    assert scores[3] == 0
    assert ((scores[:3] >= 1 / math.sqrt(128)) & (scores[:3] <= 1)).all()


def test_aimer_uses_fp32_for_bf16_weights():
    weights = torch.randn(2, 64, 64)
    torch.testing.assert_close(
        aimer_score([weights.bfloat16()]), aimer_score([weights.bfloat16().float()])
    )
    assert aimer_score([weights.bfloat16()]).dtype == torch.float32


def test_streamed_scores_equal_stacked_scores():
    gate, up, down = torch.randn(5, 8, 4), torch.randn(5, 8, 4), torch.randn(5, 4, 8)
    streamed = aimer_score_experts([[gate[e], up[e], down[e]] for e in range(5)])
    torch.testing.assert_close(streamed, aimer_score([gate, up, down]))


def test_streamed_scores_refuse_experts_of_different_sizes():
    with pytest.raises(ValueError, match="experts differ in size"):
        aimer_score_experts([[torch.ones(2, 2)], [torch.ones(2, 3)]])


def test_streamed_scores_span_several_cpu_blocks(monkeypatch):
    """A weight larger than the CPU kernel's block is summed block by block,
    the last block partial: the scores still equal the whole-tensor ones."""
    from ream_modifiers.modifiers.aimer import score

    monkeypatch.setattr(score, "_CPU_BLOCK", 1000)
    experts = [
        [torch.randn(48, 64).to(torch.bfloat16), torch.randn(64, 48).to(torch.bfloat16)]
        for _ in range(3)
    ]  # 3072 weights per tensor: 3 full blocks and one of 72
    stacked = aimer_score([torch.stack(ws) for ws in zip(*experts, strict=True)])
    torch.testing.assert_close(aimer_score_experts(experts), stacked)
