import torch

from ream_modifiers.engines.align import (
    activation_descriptors,
    match_neurons,
    neuron_rows,
    weight_descriptors,
)
from ream_modifiers.engines.merge import merge_coefficients, merge_group
from ream_modifiers.moe.layer import ExpertWeights


def _two_experts(perm):
    generator = torch.Generator().manual_seed(0)
    gate, up = torch.randn(2, 32, 16, generator=generator).unbind(0)
    down = torch.randn(16, 32, generator=generator)
    # expert 1: expert 0 with its neurons shuffled (same function)
    return ExpertWeights(
        gate=torch.stack([gate, gate[perm]]),
        up=torch.stack([up, up[perm]]),
        down=torch.stack([down, down[:, perm]]),
    )


def _expert_output(weights, e, x):
    hidden = torch.nn.functional.silu(x @ weights.gate[e].T) * (x @ weights.up[e].T)
    return hidden @ weights.down[e].T


def test_alignment_recovers_a_permutation_and_merging_is_lossless():
    perm = torch.randperm(32, generator=torch.Generator().manual_seed(3))
    weights = _two_experts(perm)
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(2))
    # outputs reach ~500: the permuted sum differs in its last bits
    torch.testing.assert_close(
        _expert_output(weights, 1, x),
        _expert_output(weights, 0, x),
        rtol=1e-6,
        atol=1e-4,
    )
    inverse = torch.argsort(perm).tolist()
    for tables in (
        [weight_descriptors(weights, [0, 1], dim=8)],
        [{e: neuron_rows(weights, e) for e in (0, 1)}],
    ):
        (found,) = match_neurons(0, [1], tables)
        # member neuron found[a] sits where the centroid's neuron a is
        assert found == inverse
    samples = torch.stack(
        [
            torch.nn.functional.silu(x @ weights.gate[e].T) * (x @ weights.up[e].T)
            for e in (0, 1)
        ]
    )
    (found,) = match_neurons(0, [1], [activation_descriptors(samples, [0, 1])])
    assert found == inverse
    merged = merge_group(weights, [0, 1], [0.3, 0.7], [None, found])
    torch.testing.assert_close(merged["gate"], weights.gate[0])
    torch.testing.assert_close(merged["up"], weights.up[0])
    torch.testing.assert_close(merged["down"], weights.down[0])


def test_unaligned_merge_is_the_weighted_average_in_the_weights_dtype():
    weights = ExpertWeights(
        gate=None,
        up=torch.tensor([[[1.0]], [[3.0]]]).bfloat16(),
        down=torch.tensor([[[2.0]], [[6.0]]]).bfloat16(),
    )
    merged = merge_group(weights, [0, 1], [0.25, 0.75])
    assert merged["up"].dtype == torch.bfloat16 and merged["up"].item() == 2.5
    assert merged["down"].item() == 5.0 and "gate" not in merged


def test_merge_coefficients_floor_zero_scores():
    scores = torch.tensor([2.0, 0.0, 1.0, 4.0])
    assert merge_coefficients(scores, [3, 0]) == [4 / 6, 2 / 6]
    # a never-routed member enters with min(0.5, smallest positive score)
    assert merge_coefficients(scores, [2, 1]) == [1 / 1.5, 0.5 / 1.5]


def _low_rank_layer(experts=6, neurons=32, hidden=32, rank=8, noise=1e-3):
    """Experts whose neuron rows lie near a ``rank``-dimensional subspace."""
    generator = torch.Generator().manual_seed(5)
    basis = torch.randn(rank, 3 * hidden, generator=generator)
    scale = torch.linspace(4.0, 1.0, rank)  # distinct variances: a clear order
    rows = torch.randn(experts, neurons, rank, generator=generator) * scale @ basis
    rows += noise * torch.randn(rows.shape, generator=generator)
    gate, up, down = rows.split(hidden, dim=-1)
    return ExpertWeights(gate=gate, up=up, down=down.transpose(1, 2))


def test_lowrank_pca_finds_the_exact_directions_of_a_layer_with_a_spectral_gap():
    from ream_modifiers.engines.align import _exact_directions, _lowrank_directions

    weights = _low_rank_layer()
    exact_mean, exact = _exact_directions(weights, 8)
    lowrank_mean, lowrank = _lowrank_directions(weights, 8)
    torch.testing.assert_close(lowrank_mean, exact_mean)
    # every principal angle between the two subspaces is ~0, and each
    # direction matches its exact counterpart up to sign
    assert torch.linalg.svdvals(exact.T @ lowrank).min() > 0.9999
    assert (exact * lowrank).sum(0).abs().min() > 0.999
    # so the descriptors match the same neurons
    shuffled = torch.randperm(32, generator=torch.Generator().manual_seed(1))
    member = ExpertWeights(
        gate=torch.cat([weights.gate, weights.gate[:1, shuffled]]),
        up=torch.cat([weights.up, weights.up[:1, shuffled]]),
        down=torch.cat([weights.down, weights.down[:1, :, shuffled]]),
    )
    for method in ("lowrank", "exact"):
        tables = [weight_descriptors(member, [0, 6], dim=8, method=method)]
        (found,) = match_neurons(0, [6], tables)
        assert found == torch.argsort(shuffled).tolist(), method


def test_weight_pca_refuses_an_unknown_method():
    import pytest

    from ream_modifiers.engines.align import weight_pca

    with pytest.raises(ValueError, match="lowrank"):
        weight_pca(_low_rank_layer(), 8, method="svd")
