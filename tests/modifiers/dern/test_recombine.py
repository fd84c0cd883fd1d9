import torch

from ream_modifiers.engines.align import neuron_rows
from ream_modifiers.modifiers.dern.recombine import (
    assign_segments,
    recombine_expert,
    router_transfer,
    spherical_kmeans,
)
from ream_modifiers.moe.layer import ExpertWeights


def _weights(experts=4, width=16, hidden=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return ExpertWeights(
        gate=torch.randn(experts, width, hidden, generator=generator),
        up=torch.randn(experts, width, hidden, generator=generator),
        down=torch.randn(experts, hidden, width, generator=generator),
    )


def _output(w, e, x):
    return (torch.nn.functional.silu(x @ w.gate[e].T) * (x @ w.up[e].T)) @ w.down[e].T


def test_segments_sum_to_the_expert_output():
    w = _weights()
    x = torch.randn(5, 8)
    segments = [
        w.down[1][:, i]
        * (torch.nn.functional.silu(x @ w.gate[1][i]) * (x @ w.up[1][i]))[:, None]
        for i in range(16)
    ]
    torch.testing.assert_close(torch.stack(segments).sum(0), _output(w, 1, x))


def test_a_copied_expert_transfers_completely_and_recombines_losslessly():
    w = _weights()
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(1))
    w.gate[3], w.up[3], w.down[3] = w.gate[0][perm], w.up[0][perm], w.down[0][:, perm]
    transfers = assign_segments(w, dropped=[3], retained=[0, 1, 2], threshold=0.6)
    assert sorted(n for _, n in transfers[0]) == list(range(16))
    assert transfers[1] == [] and transfers[2] == []
    assert router_transfer(transfers, 16) == {0: {3: 1.0}, 1: {}, 2: {}}
    importance = torch.tensor([0.5, 0.2, 0.2, 0.1])
    new = recombine_expert(w, 0, transfers[0], importance)
    assert new["gate"].shape == (16, 8) and new["down"].shape == (8, 16)
    x = torch.randn(7, 8)
    merged = ExpertWeights(
        gate=new["gate"][None], up=new["up"][None], down=new["down"][None]
    )
    torch.testing.assert_close(
        _output(merged, 0, x), _output(w, 0, x), rtol=1e-5, atol=1e-5
    )


def test_threshold_one_moves_nothing_from_distinct_experts():
    w = _weights()
    transfers = assign_segments(w, dropped=[2, 3], retained=[0, 1], threshold=1.0)
    assert transfers == {0: [], 1: []}


def test_blocked_search_equals_unblocked():
    w = _weights(experts=6, seed=4)
    small = assign_segments(w, [4, 5], [0, 1, 2, 3], -1.0, block_elements=1)
    large = assign_segments(w, [4, 5], [0, 1, 2, 3], -1.0, block_elements=1 << 30)
    assert small == large
    assert sum(map(len, small.values())) == 32  # tau = -1: every segment moves


def test_kmeans_keeps_the_width_and_is_deterministic():
    w = _weights(seed=2)
    received = [(3, i) for i in range(16)] + [(2, i) for i in range(0, 16, 2)]
    importance = torch.tensor([0.4, 0.3, 0.2, 0.1])
    first = recombine_expert(w, 1, received, importance, iterations=10)
    second = recombine_expert(w, 1, received, importance, iterations=10)
    for name in ("gate", "up", "down"):
        assert torch.equal(first[name], second[name])
    assert first["up"].shape == w.up[1].shape and first["down"].shape == w.down[1].shape
    assert recombine_expert(w, 1, [], importance) is None


def test_spherical_kmeans_equalises_norms_inside_a_cluster():
    points = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0]])
    centres = spherical_kmeans(
        points, torch.tensor([1.0, 3.0, 1.0]), torch.tensor([0, 2])
    )
    # cluster {0, 1}: both rescaled to the mean norm 2 before the weighted mean
    torch.testing.assert_close(centres, torch.tensor([[2.0, 0.0], [0.0, 2.0]]))


def test_neuron_rows_layout():
    w = _weights()
    rows = neuron_rows(w, 2)
    assert torch.equal(rows[5], torch.cat([w.gate[2][5], w.up[2][5], w.down[2][:, 5]]))
