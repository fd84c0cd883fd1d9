"""M-SMoE: merge every expert into its most similar frequency-dominant expert."""

from __future__ import annotations

from typing import ClassVar

from ream_modifiers.modifiers.merging import FrequencyMergingBaseline, Grouping, Merge

__all__ = ["MSMoEModifier"]


class MSMoEModifier(FrequencyMergingBaseline):
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

    grouping: Grouping = "mcsmoe"
    merge: Merge = "weight_matching"

    method: ClassVar[str] = "M-SMoE"
    paper: ClassVar[str] = "https://arxiv.org/abs/2310.01334"
    paper_title: ClassVar[str] = (
        "Merge, Then Compress: Demystify Efficient SMoE with Hints from Its Routing "
        "Policy"
    )
