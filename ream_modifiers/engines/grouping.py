"""
Grouping experts for merging: REAM's pseudo-pruning, HC-SMoE's hierarchical
clustering and M-SMoE's dominant-expert assignment.

Every function works on one partition of experts (all of a layer, or one router
group of a group-limited router, since merging across groups changes routing) and
returns ``{centroid: [members...]}`` with members excluding the centroid.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = [
    "Groups",
    "cosine_matrix",
    "ream_distance",
    "pseudo_group",
    "dominant_assignment",
    "hierarchical_groups",
    "check_group_capacity",
    "within_distance",
]

Groups = dict[int, list[int]]


def cosine_matrix(features: torch.Tensor) -> torch.Tensor:
    """``[E, E]`` cosine similarity of the rows of ``features`` (fp64)."""
    features = features.double()
    unit = features / features.norm(dim=-1, keepdim=True).clamp(min=1e-30)
    return unit @ unit.T


def ream_distance(
    mean_outputs: torch.Tensor, logit_cosine: torch.Tensor | None = None
) -> torch.Tensor:
    """
    REAM's expert distance D = 1 - (sim_out + sim_gate) / 2, with
    sim_out = (1 + cos(mu_i, mu_j)) / 2 on the (gated) mean outputs and
    sim_gate = 1 - d_ij / max d, d_ij = ||z_i - z_j|| for unit logit columns
    z (so d = sqrt(2 - 2 cos)). Without logits, D = 1 - sim_out.
    """
    sim_out = (1.0 + cosine_matrix(mean_outputs)) / 2.0
    if logit_cosine is None:
        return 1.0 - sim_out
    d = (2.0 - 2.0 * logit_cosine.double()).clamp(min=0.0).sqrt()
    sim_gate = 1.0 - d / d.max().clamp(min=1e-30)
    return 1.0 - (sim_out + sim_gate) / 2.0


def check_group_capacity(num_experts: int, kept: int, group_size: int) -> None:
    """
    Pseudo-grouping lets each of ``kept`` centroids absorb ``group_size - 1``
    others, so it needs ``kept * group_size >= num_experts``.
    """
    if group_size and kept * group_size < num_experts:
        needed = -(-num_experts // kept)
        raise ValueError(
            f"group_size={group_size} is too small to merge {num_experts} experts into "
            f"{kept}: each kept expert absorbs at most group_size-1 others. Use "
            f"group_size >= {needed}, or group_size: 0 for unbounded groups."
        )


def _ordered(scores: torch.Tensor, members: Sequence[int]) -> list[int]:
    """``members`` by descending score, ties to the lower index."""
    values = scores.double().cpu()[list(members)]
    order = torch.argsort(-values, stable=True).tolist()
    return [members[i] for i in order]


def pseudo_group(
    saliency: torch.Tensor,
    distance: torch.Tensor,
    kept: int,
    group_size: int,
    members: Sequence[int] | None = None,
) -> Groups:
    """
    REAM's pseudo-pruning grouping. The ``kept`` most salient experts are the
    centroids. In descending saliency each centroid absorbs its nearest
    still-unassigned experts until its group holds ``group_size`` experts, so a
    few large groups form and most centroids stay singletons. ``group_size=0``
    instead assigns every other expert to its nearest centroid (MC-SMoE style).

    :param saliency: ``[E]`` scores of the whole layer
    :param distance: ``[E, E]`` expert distances of the whole layer
    :param kept: centroids to choose within ``members``
    :param members: the partition to group (default: all experts)
    """
    members = list(range(saliency.numel())) if members is None else list(members)
    check_group_capacity(len(members), kept, group_size)
    centroids = _ordered(saliency, members)[:kept]
    distance = distance.double().cpu()
    groups: Groups = {c: [] for c in centroids}
    others = [m for m in members if m not in groups]
    if group_size == 0:
        for m in others:
            nearest = min(centroids, key=lambda c: (float(distance[c, m]), c))
            groups[nearest].append(m)
        return groups
    unassigned = set(others)
    for c in centroids:
        if not unassigned:
            break
        by_distance = sorted(unassigned, key=lambda j: (float(distance[c, j]), j))
        take = by_distance[: group_size - 1]
        groups[c].extend(take)
        unassigned.difference_update(take)
    return groups


def within_distance(groups: Groups, distance: torch.Tensor, limit: float) -> Groups:
    """
    ``groups`` with every member farther than ``limit`` from its centroid left
    out: such members are pruned instead of merged into a centroid they do not
    resemble.
    """
    distance = distance.double().cpu()
    return {
        c: [m for m in members if float(distance[c, m]) <= limit]
        for c, members in groups.items()
    }


def dominant_assignment(
    scores: torch.Tensor,
    similarity: torch.Tensor,
    kept: int,
    members: Sequence[int] | None = None,
) -> Groups:
    """
    M-SMoE: the ``kept`` highest-scoring experts (by routing frequency in the
    paper) are dominant; every other expert joins the dominant expert it is most
    similar to.
    """
    members = list(range(scores.numel())) if members is None else list(members)
    dominant = _ordered(scores, members)[:kept]
    similarity = similarity.double().cpu()
    groups: Groups = {d: [] for d in dominant}
    for m in members:
        if m not in groups:
            best = max(dominant, key=lambda d: (float(similarity[d, m]), -d))
            groups[best].append(m)
    return groups


def hierarchical_groups(
    features: torch.Tensor,
    kept: int,
    members: Sequence[int] | None = None,
) -> Groups:
    """
    HC-SMoE: average-linkage agglomerative clustering of ``features`` (Euclidean)
    into exactly ``kept`` clusters; each cluster is represented by the member
    closest to the cluster mean, which keeps its slot and router row.
    """
    from scipy.cluster.hierarchy import cut_tree, linkage

    members = list(range(features.shape[0])) if members is None else list(members)
    points = features.double().cpu()[members].numpy()
    if kept >= len(members):
        return {m: [] for m in members}
    labels = cut_tree(linkage(points, method="average"), n_clusters=kept).flatten()
    groups: Groups = {}
    for label in np.unique(labels):
        cluster = [members[i] for i in np.flatnonzero(labels == label)]
        mean = points[labels == label].mean(axis=0)
        spread = [
            float(np.linalg.norm(points[members.index(m)] - mean)) for m in cluster
        ]
        representative = cluster[int(np.argmin(spread))]
        groups[representative] = [m for m in cluster if m != representative]
    return groups
