import pytest
import torch

from ream_modifiers.engines.grouping import (
    check_group_capacity,
    cosine_matrix,
    dominant_assignment,
    hierarchical_groups,
    pseudo_group,
    ream_distance,
)


@pytest.mark.parametrize(
    "kept, merged_sizes, singletons",
    [(96, [16, 16, 3], 93), (64, [16, 16, 16, 16, 5], 59)],
)
def test_pseudo_grouping_reproduces_the_spec_pattern(kept, merged_sizes, singletons):
    generator = torch.Generator().manual_seed(0)
    saliency = torch.rand(128, generator=generator)
    points = torch.randn(128, 16, generator=generator)
    groups = pseudo_group(saliency, torch.cdist(points, points), kept, group_size=16)
    sizes = sorted((len(m) + 1 for m in groups.values() if m), reverse=True)
    assert sizes == merged_sizes
    assert sum(1 for m in groups.values() if not m) == singletons
    # centroids are the most salient experts, every expert is placed exactly once
    assert set(groups) == set(saliency.argsort(descending=True)[:kept].tolist())
    placed = [e for c, m in groups.items() for e in (c, *m)]
    assert sorted(placed) == list(range(128))
    # the most salient centroid absorbs its 15 nearest non-centroid experts
    top = int(saliency.argmax())
    distance = torch.cdist(points, points)[top]
    nearest = [j for j in distance.argsort().tolist() if j not in groups][:15]
    assert sorted(groups[top]) == sorted(nearest)


def test_unbounded_groups_assign_to_the_nearest_centroid():
    saliency = torch.tensor([3.0, 2.0, 0.1, 0.2])
    distance = torch.tensor(
        [[0, 9, 1, 8], [9, 0, 7, 2], [1, 7, 0, 9], [8, 2, 9, 0]], dtype=torch.float64
    )
    assert pseudo_group(saliency, distance, 2, group_size=0) == {0: [2], 1: [3]}


def test_group_capacity_error_names_the_fix():
    with pytest.raises(ValueError, match="group_size >= 4"):
        check_group_capacity(16, 4, 3)
    check_group_capacity(16, 4, 0)


def test_ream_distance_combines_outputs_and_logits():
    means = torch.tensor([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0]])
    distance = ream_distance(means)
    assert distance[0, 1] == pytest.approx(0.0) and distance[0, 2] == pytest.approx(1.0)
    logits = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]).T  # experts as rows
    both = ream_distance(means, cosine_matrix(logits))
    # experts 0 and 1 have identical outputs but orthogonal logits
    assert both[0, 1] == pytest.approx(0.5)


def test_hierarchical_groups_match_scipy_average_linkage():
    points = torch.tensor([[0.0], [0.1], [5.0], [5.2], [9.0], [9.1]])
    groups = hierarchical_groups(points, 3)
    assert sorted(sorted([c, *m]) for c, m in groups.items()) == [
        [0, 1],
        [2, 3],
        [4, 5],
    ]
    three = torch.tensor([[0.0], [1.0], [1.2]])
    # representative: the member closest to the cluster mean (0.733)
    assert hierarchical_groups(three, 1) == {1: [0, 2]}


def test_dominant_assignment_uses_frequency_then_similarity():
    frequency = torch.tensor([10.0, 1.0, 8.0, 2.0])
    similarity = torch.eye(4, dtype=torch.float64)
    similarity[1, 2] = similarity[2, 1] = 0.9
    similarity[3, 0] = similarity[0, 3] = 0.8
    assert dominant_assignment(frequency, similarity, 2) == {0: [3], 2: [1]}


def test_within_distance_prunes_far_members_and_keeps_centroids():
    from ream_modifiers.engines.grouping import within_distance

    distance = torch.tensor(
        [[0.0, 0.2, 0.5, 0.31], [0.2, 0, 0, 0], [0.5, 0, 0, 0], [0.31, 0, 0, 0]]
    )
    groups = {0: [1, 2, 3], 4: []}
    assert within_distance(groups, distance, 0.3) == {0: [1], 4: []}
    assert within_distance(groups, distance, 0.5) == {0: [1, 2, 3], 4: []}
