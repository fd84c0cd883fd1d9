import torch

from ream_modifiers.modifiers.moeits.nmi import (
    greedy_removal,
    iqr_threshold,
    layer_nmi,
    nmi_matrix,
)


def test_nmi_of_a_weight_with_itself_is_one_and_symmetric():
    stack = torch.randn(4, 64, 32)
    stack[2] = stack[0]
    nmi = nmi_matrix(stack, bins=32)
    torch.testing.assert_close(nmi.diagonal(), torch.ones(4, dtype=torch.float64))
    assert nmi[0, 2] == 1.0 and nmi[2, 0] == 1.0
    torch.testing.assert_close(nmi, nmi.T)


def test_nmi_of_independent_weights_is_near_zero():
    stack = torch.randn(3, 400, 250, generator=torch.Generator().manual_seed(0))
    nmi = nmi_matrix(stack, bins=16)
    off = nmi[~torch.eye(3, dtype=torch.bool)]
    assert off.max() < 0.01


def test_nmi_is_blocked_consistently():
    stack = torch.randn(7, 50, 20)
    torch.testing.assert_close(
        nmi_matrix(stack, 16, block=1), nmi_matrix(stack, 16, block=8)
    )


def test_layer_nmi_weights_projections_and_zeroes_the_diagonal():
    gate, up, down = torch.randn(3, 4, 16, 16).unbind(0)
    up[1] = up[0]
    matrix = layer_nmi(
        {"gate": gate, "up": up, "down": down},
        {"gate": 0.2, "up": 0.4, "down": 0.4},
        bins=8,
    )
    assert matrix.diagonal().abs().max() == 0
    expected = (
        0.2 * nmi_matrix(gate, 8) + 0.4 * nmi_matrix(up, 8) + 0.4 * nmi_matrix(down, 8)
    )
    torch.testing.assert_close(matrix[0, 1], expected[0, 1])


def test_a_duplicated_expert_is_removed_first():
    stack = torch.randn(6, 40, 40, generator=torch.Generator().manual_seed(3))
    stack[4] = stack[1]
    matrix = layer_nmi({"up": stack}, {"up": 1.0}, bins=16)
    kept = greedy_removal(matrix, range(6), keep=5)
    assert len(kept) == 5 and (1 in kept) != (4 in kept)


def test_greedy_tie_rules_and_threshold():
    matrix = torch.tensor(
        [[0.0, 0.9, 0.1], [0.9, 0.0, 0.1], [0.1, 0.1, 0.0]], dtype=torch.float64
    )
    # pair (0, 1); equal means -> the second of the pair goes
    assert greedy_removal(matrix, range(3), keep=2) == [0, 2]
    assert greedy_removal(matrix, range(3), threshold=0.95) == [0, 1, 2]
    # adaptive stop never goes below min_keep
    assert len(greedy_removal(matrix, range(3), threshold=-1.0, min_keep=2)) == 2
    flat = matrix.flatten()
    q1, q3 = torch.quantile(flat, torch.tensor([0.25, 0.75], dtype=torch.float64))
    assert iqr_threshold(matrix, 1.5) == float(flat.mean() + 1.5 * (q3 - q1))
