"""
REAP: Router-weighted Expert Activation Pruning.

Lasby et al., "REAP the Experts: Why Pruning Prevails for One-Shot MoE
Compression", 2025. https://arxiv.org/abs/2510.13999
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import PrivateAttr

from ream_modifiers.engines.saliency import (
    Saliency,
    needs_probabilities,
    saliency,
    super_expert_mask,
)
from ream_modifiers.engines.selection import select_kept
from ream_modifiers.modifiers.base import ExpertReductionModifier, LayerDecision
from ream_modifiers.moe.layer import MoELayer
from ream_modifiers.observe.statistics import RoutedExpertSums, RoutedStatistics

__all__ = ["REAPModifier"]


class REAPModifier(ExpertReductionModifier):
    """
    Prunes, in every MoE layer, the routed experts with the lowest REAP saliency

        S_j = (1 / |X_j|) * sum_{x in X_j} g_j(x) * ||f_j(x)||_2

    where X_j is the set of calibration tokens routed to expert j, g_j(x) the weight
    the model multiplies expert j's output by, and f_j(x) the expert's output.
    Experts never routed to score 0 and go first.

    Choices, relative to the reference code (CerebrasResearch/reap):

    - g_j is the model's *actual* top-k weight: renormalised only if the model
      renormalises, with group-limited selection, score-correction bias and
      ``routed_scaling_factor`` applied as the model applies them. The reference
      instead re-derives softmax(logits) with a plain top-k, which differs for
      sigmoid/bias routers (DeepSeek-V3, GLM-4.5) and for Mixtral (renormalises at
      inference but the reference does not renormalise its g). This matches the
      paper's definition and llm-compressor's ``REAPPruningModifier``.
    - The mean is exact over routed tokens, and padding tokens are excluded.
    - Layers are pruned one at a time at their ``SEQUENTIAL_EPOCH_END``, so later
      layers calibrate on the already-pruned ones (the reference observes the
      unpruned model once).

    The same number of experts is kept in every layer; with group-limited routers
    (``n_group`` > 1) the same number is removed from every group. A budget that
    leaves fewer than top-k reachable experts fails before calibration.

    Example recipe::

        reap_stage:
          reap_modifiers:
            REAPModifier:
              sparsity: 0.25
              preserve_super_experts: false
              report_path: reap_report.json
            GPTQModifier: {targets: [Linear], scheme: W4A16, ignore: [lm_head]}

    Lifecycle:

    - on_initialize: find MoE layers, plan the per-layer budget, fail fast
    - on_calibration_start: attach one statistics collector per MoE layer
    - on_sequential_epoch_end: reduce statistics across ranks, score, prune
    - on_finalize: update every expert-count config key, write the report

    ``num_experts`` / ``sparsity``, ``ignore``, ``report_path`` and
    ``protect_routers``: see :class:`ExpertReductionModifier`.

    :param preserve_super_experts: never prune "super experts", whose largest
        output activation exceeds both the 99.5th percentile of all experts'
        maxima and a tenth of the overall maximum (the reference's outlier rule,
        applied to the first ``super_expert_layer_fraction`` of MoE layers). In
        the sequential pipeline later layers are not observed yet, so the
        percentile runs over the layers seen so far.
    :param super_expert_layer_fraction: share of MoE layers (from the first) where
        super experts are protected
    :param saliency: ``reap`` (default, the paper's score); ``ream`` and
        ``ream_tokens`` rank by the REAM reference's p^2*||f||; ``ean``,
        ``ean_mean``, ``frequency`` and ``weighted_frequency`` select the baselines
        of the REAP paper (definitions in :mod:`ream_modifiers.engines.saliency`)
    """

    requires_calibration_data: bool = True

    preserve_super_experts: bool = False
    super_expert_layer_fraction: float = 0.75
    saliency: Saliency = "reap"

    method: ClassVar[str] = "REAP"
    paper: ClassVar[str] = "https://arxiv.org/abs/2510.13999"
    paper_title: ClassVar[str] = (
        "REAP the Experts: Why Pruning Prevails for One-Shot MoE Compression"
    )

    _seen_max_activations: list[torch.Tensor] = PrivateAttr(default_factory=list)

    def statistics(self, layer: MoELayer) -> RoutedStatistics:
        probabilities = needs_probabilities(self.saliency)
        return RoutedStatistics(
            RoutedExpertSums(layer.num_experts, probabilities=probabilities)
        )

    def decide(self, layer: MoELayer, stats: RoutedStatistics) -> LayerDecision:
        sums = stats.routed.tensors
        scores = ranking = saliency(sums, self.saliency)
        extra: dict = {"frequency": sums["count"].cpu().tolist()}
        if self.preserve_super_experts and self._protects(layer):
            peaks = sums["max_activation"].double().cpu()
            self._seen_max_activations.append(peaks)
            protected = super_expert_mask(peaks, torch.cat(self._seen_max_activations))
            ranking = torch.where(protected.to(scores.device), float("inf"), scores)
            extra["super_experts"] = protected.nonzero().flatten().tolist()
        kept = select_kept(ranking, self.layer_budget(layer), remove="lowest")
        return LayerDecision(kept=kept, scores=scores.cpu().tolist(), extra=extra)

    def _protects(self, layer: MoELayer) -> bool:
        position = [x.name for x in self._layers].index(layer.name)
        return position < int(len(self._layers) * self.super_expert_layer_fraction)
