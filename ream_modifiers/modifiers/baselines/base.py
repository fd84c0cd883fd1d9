"""
The baselines of the REAP and REAM papers, as named modifiers on the shared
engines: HC-SMoE and M-SMoE merge through :class:`ExpertMergingModifier`,
frequency and EAN pruning through :class:`REAPModifier`'s statistics.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from ream_modifiers.methods.saliency import Saliency
from ream_modifiers.modifiers.ream.base import ExpertMergingModifier, Grouping, Merge
from ream_modifiers.modifiers.reap.base import REAPModifier

__all__ = [
    "HCSMoEModifier",
    "MSMoEModifier",
    "FrequencyPruningModifier",
    "EANPruningModifier",
]


class HCSMoEModifier(ExpertMergingModifier):
    """
    HC-SMoE (Chen et al., ICML 2025, https://arxiv.org/abs/2410.08589): per layer,
    average-linkage agglomerative clustering (Euclidean) of the experts' mean
    outputs over **all** calibration tokens into k clusters, then a
    frequency-weighted average of each cluster, without neuron alignment. The
    member closest to the cluster mean keeps its slot and router row (as REAM's
    ``grouping: hcsmoe`` does; the HC-SMoE fork uses the lowest index).

    Example recipe::

        hcsmoe_stage:
          hcsmoe_modifiers:
            HCSMoEModifier: {sparsity: 0.25}
    """

    method: ClassVar[str] = "HC-SMoE"
    paper: ClassVar[str] = "https://arxiv.org/abs/2410.08589"

    grouping: Grouping = "hcsmoe"
    merge: Merge = "weighted"
    merge_coefficients: Literal["saliency", "frequency"] = "frequency"
    saliency: Saliency = "frequency"
    gated_similarity: bool = False
    group_size: int = 0


class MSMoEModifier(ExpertMergingModifier):
    """
    M-SMoE, the merge stage of MC-SMoE (Li et al., ICLR 2024,
    https://arxiv.org/abs/2310.01334): per layer, the k most frequently routed
    experts are dominant; every other expert joins the dominant expert whose
    router-logit column is most similar (cosine over all calibration tokens);
    members are aligned to their dominant expert by weight matching (Hungarian on
    squared distances of [gate | up | down^T] neuron rows) and merged by a
    frequency-weighted average. Dominant experts are chosen per layer (uniform
    counts, which vLLM needs), not globally as in the original.

    Example recipe::

        msmoe_stage:
          msmoe_modifiers:
            MSMoEModifier: {sparsity: 0.25}
    """

    method: ClassVar[str] = "M-SMoE"
    paper: ClassVar[str] = "https://arxiv.org/abs/2310.01334"

    grouping: Grouping = "mcsmoe"
    merge: Merge = "weight_matching"
    merge_coefficients: Literal["saliency", "frequency"] = "frequency"
    saliency: Saliency = "frequency"
    gated_similarity: bool = False
    group_size: int = 0


class FrequencyPruningModifier(REAPModifier):
    """
    Frequency pruning: remove the experts routed to least often, S_j = |X_j|.

    Example recipe::

        prune_stage:
          prune_modifiers:
            FrequencyPruningModifier: {sparsity: 0.25}
    """

    method: ClassVar[str] = "Frequency"
    saliency: Literal["frequency"] = "frequency"


class EANPruningModifier(REAPModifier):
    """
    EAN pruning (Jaiswal et al., 2025, "Finding Fantastic Experts in MoEs"), as
    the REAP paper runs it:
    remove the experts with the smallest sum over routed tokens of ||f_j(x)||_2
    (``saliency: ean``, the paper's form; ``ean_mean`` averages per token).

    Example recipe::

        prune_stage:
          prune_modifiers:
            EANPruningModifier: {sparsity: 0.25}
    """

    method: ClassVar[str] = "EAN"
    saliency: Literal["ean", "ean_mean"] = "ean"
