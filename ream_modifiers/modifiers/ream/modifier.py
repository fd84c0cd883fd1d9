"""
REAM: Router-weighted Expert Activation Merging.

Jha et al., "REAM: Merging Improves Pruning of Experts in LLMs", 2026.
https://arxiv.org/abs/2604.04356
"""

from __future__ import annotations

from typing import ClassVar

from ream_modifiers.engines.saliency import Saliency
from ream_modifiers.modifiers.merging import ExpertMergingModifier

__all__ = ["REAMModifier"]


class REAMModifier(ExpertMergingModifier):
    """
    REAM merges, per MoE layer, groups of experts into one instead of removing
    them. For a layer with N experts and k to keep:

    1. saliency S_j = mean over the tokens routed to j of p_j(x)^2*||f_j(x)||_2
       (``saliency: ream_tokens``), p_j the router's unrenormalised probability
       (softmax over all experts; the sigmoid score for sigmoid routers, without
       the correction bias); the k most salient experts are the centroids;
    2. distance D_ij = 1 - (sim_out + sim_gate)/2, sim_out = (1 + cos(mu_i, mu_j))/2
       on gated mean outputs mu_j = mean_x p_j(x) f_j(x) over all tokens, and
       sim_gate = 1 - d_ij/max d from the router-logit columns;
    3. pseudo-pruning: centroids in descending saliency each absorb up to
       ``group_size``-1 nearest unassigned experts;
    4. each member's neurons are aligned to the centroid by Hungarian matching on
       cdist(activations) + cdist(PCA weight descriptors);
    5. the group becomes sum_i w_i P_i(theta_i), w_i = S_i / sum S, written into the
       centroid, which keeps its router row and bias; the rest are removed;
    6. ``verify_merges``: the layer is replayed on the sampled calibration inputs
       and a group is merged only where that brings the compressed layer's routed
       output closer to the original than the centroid alone; otherwise its
       members are pruned.

    Defaults, measured on held-out perplexity of the trained fixture
    (BENCHMARKS.md, "Saliency and merge ablation"): the reference code's
    p^2*||f|| saliency beats the REAP paper's g*||f|| (``saliency: reap``) by a
    wide margin at 50%, for merging and pruning alike; its exact per-token mean
    (``ream_tokens``) beats the reference's mean of per-batch means (``ream``),
    which discounts experts absent from most batches (domain specialists) and
    depends on the batch size; and merging every group (the reference,
    ``verify_merges: false``) loses to pruning with the same saliency, so merges
    are verified.

    Statistics come from llm-compressor's sequential pipeline, on hidden states
    that already passed through the merged earlier layers.

    Deliberate differences from the reference code (SamsungSAILMontreal/ream):

    - neuron activations are sampled on the *same* tokens for every expert (the
      reference draws different random tokens per expert, so its activation cost
      compares neurons on different inputs);
    - padding tokens are excluded from every statistic;
    - means are exact over tokens, not means of per-chunk means
      (``saliency: ream`` keeps the reference's mean of per-batch means);
    - merges are verified (``verify_merges``); the reference merges every group;
    - for sigmoid routers (GLM-4.5, DeepSeek-V3) p is the model's sigmoid score
      and the routed tokens are the model's own selection (the reference takes a
      softmax of the raw logits and a plain top-k); ``saliency: reap`` is the REAP
      paper's g*||f|| instead, ``saliency: frequency`` the paper's "no REAP"
      ablation (all choices in :mod:`ream_modifiers.engines.saliency`);
    - router-logit similarity comes from the exact Gram matrix of all tokens'
      logits rather than stored logits;
    - the PCA weight descriptor is randomised like the reference's, with 16
      oversampled directions and 4 power iterations instead of its 0 and 2, on
      the streamed covariance (``pca_method: exact`` gives the exact
      eigendecomposition: the same held-out recovery on the fixture, 11x the
      time at Qwen3-30B-A3B's width; BENCHMARKS.md);
    - with group-limited routers, centroids and groups stay inside router groups.

    Example recipe::

        ream_stage:
          ream_modifiers:
            REAMModifier:
              sparsity: 0.25
              saliency: ream_tokens
              verify_merges: true
              group_size: 16
              max_activation_tokens: 4096
            GPTQModifier: {targets: [Linear], scheme: W4A16, ignore: [lm_head]}

    ``num_experts`` / ``sparsity``, ``ignore``, ``report_path`` and
    ``protect_routers``: see :class:`ExpertReductionModifier`.

    :param saliency: ``ream_tokens`` by default; ``ream`` for the reference's
        averaging, ``reap`` for the REAP paper's score
    :param verify_merges: True by default; False merges every group
    """

    method: ClassVar[str] = "REAM"
    paper: ClassVar[str] = "https://arxiv.org/abs/2604.04356"
    paper_title: ClassVar[str] = "REAM: Merging Improves Pruning of Experts in LLMs"

    saliency: Saliency = "ream_tokens"
    verify_merges: bool = True
