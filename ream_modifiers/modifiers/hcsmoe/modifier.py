"""HC-SMoE: hierarchical clustering of experts by mean output, then averaging."""

from __future__ import annotations

from typing import ClassVar

from ream_modifiers.modifiers.merging import FrequencyMergingBaseline, Grouping, Merge

__all__ = ["HCSMoEModifier"]


class HCSMoEModifier(FrequencyMergingBaseline):
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
    paper_title: ClassVar[str] = (
        "Retraining-Free Merging of Sparse MoE via Hierarchical Clustering"
    )

    grouping: Grouping = "hcsmoe"
    merge: Merge = "weighted"
