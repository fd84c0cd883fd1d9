"""
DERN's neuron-level recombination: segments, their transfer to retained experts,
and weighted spherical k-means back to the original width.

A segment is one intermediate neuron i of an expert, the triple
(W_gate[i, :], W_up[i, :], W_down[:, i]); the expert's output is exactly the sum
of its segments' contributions, so segments can move between experts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ream_modifiers.engines.align import neuron_rows
from ream_modifiers.moe.weights import ExpertWeights

__all__ = [
    "segment_features",
    "assign_segments",
    "spherical_kmeans",
    "recombine_expert",
    "router_transfer",
]

_PARTS = ("gate", "up", "down")


def segment_features(
    weights: ExpertWeights, expert: int, features: Sequence[str]
) -> torch.Tensor:
    """
    ``[m, c*H]`` similarity features of an expert's segments: the chosen parts
    (gate row, up row, down column), each L2-normalised, concatenated. The cosine
    of two such vectors is the mean of the per-part cosines.
    """
    parts = {
        "gate": None if weights.gate is None else weights.gate[expert],
        "up": weights.up[expert],
        "down": weights.down[expert].T,
    }
    chosen = []
    for name in features:
        part = parts[name]
        if part is None:
            raise ValueError(f"similarity feature {name!r}: the experts have no {name}")
        part = part.float()
        chosen.append(part / part.norm(dim=-1, keepdim=True).clamp(min=1e-12))
    features = torch.cat(chosen, dim=-1)
    return features / features.norm(dim=-1, keepdim=True).clamp(min=1e-12)


@torch.no_grad()
def assign_segments(
    weights: ExpertWeights,
    dropped: Sequence[int],
    retained: Sequence[int],
    threshold: float,
    features: Sequence[str] = ("up", "down"),
    block_elements: int = 1 << 26,
) -> dict[int, list[tuple[int, int]]]:
    """
    Move every segment of every dropped expert to the retained expert holding its
    most similar neuron (max cosine over that expert's segments), if that cosine
    is at least ``threshold``; other segments are discarded.

    The search is O(|P| * K * m^2 * c*H); it runs on the weights' device in blocks
    of retained experts, so at most ``block_elements`` similarities exist at once.

    :return: ``{retained expert: [(source expert, neuron), ...]}``
    """
    transfers: dict[int, list[tuple[int, int]]] = {r: [] for r in retained}
    if not dropped or not retained:
        return transfers
    width = weights.down.shape[-1]
    targets = torch.stack([segment_features(weights, r, features) for r in retained])
    block = max(1, block_elements // (width * width))
    for source in dropped:
        segments = segment_features(weights, source, features)  # [m, F]
        best = torch.full((width,), -2.0, device=segments.device)
        where = torch.zeros(width, dtype=torch.long, device=segments.device)
        for lo in range(0, len(retained), block):
            chunk = targets[lo : lo + block]  # [b, m, F]
            # [m, b, m] cosines, reduced to the best neuron of each target
            nearest = torch.einsum("if,bjf->ibj", segments, chunk).amax(dim=-1)
            value, index = nearest.max(dim=-1)
            better = value > best
            best = torch.where(better, value, best)
            where = torch.where(better, index + lo, where)
        moved = (best >= threshold).nonzero().flatten().tolist()
        targets_of = where.tolist()
        for neuron in moved:
            transfers[retained[targets_of[neuron]]].append((source, neuron))
    return transfers


def router_transfer(
    transfers: dict[int, list[tuple[int, int]]], width: int
) -> dict[int, dict[int, float]]:
    """``{retained r: {source o: n_{o->r} / m}}`` for G_r += sum_o (n/m) G_o."""
    shares: dict[int, dict[int, float]] = {}
    for target, moved in transfers.items():
        counts: dict[int, int] = {}
        for source, _ in moved:
            counts[source] = counts.get(source, 0) + 1
        shares[target] = {o: n / width for o, n in sorted(counts.items())}
    return shares


@torch.no_grad()
def spherical_kmeans(
    points: torch.Tensor,
    weights: torch.Tensor,
    init: torch.Tensor,
    iterations: int = 30,
) -> torch.Tensor:
    """
    Weighted spherical k-means: points join the centre of highest cosine; inside
    each cluster every member is rescaled to the cluster's mean norm (DERN Eq. 11)
    and the centre becomes the weighted mean. A centre whose cluster is empty
    stays where it was.

    :param points: ``[n, F]`` vectors
    :param weights: ``[n]`` non-negative weights
    :param init: ``[k]`` indices of the initial centres
    :return: ``[k, F]`` centres
    """
    points = points.float()
    weights = weights.float()
    norms = points.norm(dim=-1).clamp(min=1e-12)
    unit = points / norms.unsqueeze(-1)
    centres = points[init].clone()
    k = centres.shape[0]
    for _ in range(iterations):
        unit_centres = centres / centres.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        labels = (unit @ unit_centres.T).argmax(dim=-1)
        count = torch.zeros(k, device=points.device).index_add_(
            0, labels, torch.ones_like(norms)
        )
        mean_norm = torch.zeros(k, device=points.device).index_add_(0, labels, norms)
        mean_norm = mean_norm / count.clamp(min=1)
        scaled = unit * mean_norm[labels].unsqueeze(-1) * weights.unsqueeze(-1)
        total = torch.zeros_like(centres).index_add_(0, labels, scaled)
        mass = torch.zeros(k, device=points.device).index_add_(0, labels, weights)
        updated = total / mass.clamp(min=1e-30).unsqueeze(-1)
        new = torch.where((mass > 0).unsqueeze(-1), updated, centres)
        if torch.equal(new, centres):
            break
        centres = new
    return centres


def _initial_centres(points: torch.Tensor, hidden: int, count: int) -> torch.Tensor:
    """
    The ``count`` segments with the largest max|gate| (the first H entries; the up
    row for non-gated experts). Exact duplicates (a copied neuron) are passed over
    while distinct segments remain, so two centres never start on the same point.
    """
    lead = points[:, :hidden].abs().amax(dim=-1)
    order = torch.argsort(lead, descending=True, stable=True)
    _, inverse = torch.unique(points, dim=0, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), points.shape[0], device=points.device)
    first = first.scatter_reduce(
        0, inverse, torch.arange(len(inverse), device=points.device), "amin"
    )
    is_first = torch.zeros(points.shape[0], dtype=torch.bool, device=points.device)
    is_first[first] = True
    ranked = torch.cat([order[is_first[order]], order[~is_first[order]]])
    return ranked[:count]


@torch.no_grad()
def recombine_expert(
    weights: ExpertWeights,
    target: int,
    received: Sequence[tuple[int, int]],
    importance: torch.Tensor,
    iterations: int = 30,
) -> dict[str, torch.Tensor] | None:
    """
    Compress ``target``'s own segments plus the ``received`` ones back to its
    original width m with weighted spherical k-means over full [g; u; d] vectors.
    Segment weights are the importance of the expert they came from; the initial
    centres are the m segments with the largest max|gate| (max|up| without a
    gate). Returns the new ``gate``/``up``/``down`` or None when nothing arrived.
    """
    if not received:
        return None
    hidden = weights.up.shape[-1]
    width = weights.down.shape[-1]
    own = neuron_rows(weights, target).float()
    sources = torch.tensor([s for s, _ in received], device=own.device)
    neurons = torch.tensor([n for _, n in received], device=own.device)
    stacked = torch.stack(
        [neuron_rows(weights, e).float() for e in sorted({s for s, _ in received})]
    )
    index_of = {e: i for i, e in enumerate(sorted({s for s, _ in received}))}
    rows = stacked[torch.tensor([index_of[int(s)] for s in sources]), neurons]
    points = torch.cat([own, rows])
    importance = importance.float().to(own.device)
    point_weights = torch.cat(
        [importance[target].expand(width), importance[sources]]
    ).clamp(min=1e-12)
    init = _initial_centres(points, hidden, width)
    centres = spherical_kmeans(points, point_weights, init, iterations)
    parts = 3 if weights.gate is not None else 2
    split = centres.reshape(width, parts, hidden)
    result = {"down": split[:, -1].T.to(weights.down.dtype)}
    result["up"] = split[:, parts - 2].to(weights.up.dtype)
    if weights.gate is not None:
        result["gate"] = split[:, 0].to(weights.gate.dtype)
    return result
