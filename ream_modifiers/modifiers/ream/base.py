"""
REAM: Router-weighted Expert Activation Merging, and the merging engine shared
with the HC-SMoE and M-SMoE baselines.

Jha et al., "REAM: Merging Improves Pruning of Experts in LLMs", 2026.
https://arxiv.org/abs/2604.04356
"""

from __future__ import annotations

import time
from typing import ClassVar, Literal

import torch
from llmcompressor.core import Event, State
from llmcompressor.modeling.moe.context import get_calibrate_all_experts_flag
from loguru import logger
from pydantic import model_validator

from ream_modifiers.methods.align import (
    activation_descriptors,
    match_neurons,
    neuron_rows,
    weight_descriptors,
)
from ream_modifiers.methods.grouping import (
    Groups,
    check_group_capacity,
    dominant_assignment,
    hierarchical_groups,
    pseudo_group,
    ream_distance,
    within_distance,
)
from ream_modifiers.methods.merge import merge_coefficients, merge_group
from ream_modifiers.methods.reproduction import merge_helps
from ream_modifiers.methods.saliency import Saliency, needs_probabilities, saliency
from ream_modifiers.modifiers.base import ExpertReductionModifier, LayerDecision
from ream_modifiers.moe.edit import keep_experts, write_expert
from ream_modifiers.moe.layer import ExpertWeights, MoELayer
from ream_modifiers.observe import (
    ActivationSamples,
    InputSamples,
    LayerStatsCollector,
    MeanExpertOutput,
    RoutedExpertSums,
    RouterLogitGram,
)

__all__ = ["ExpertMergingModifier", "REAMModifier"]

Grouping = Literal["ream", "hcsmoe", "mcsmoe"]
Merge = Literal[
    "aligned",
    "weights",
    "activations",
    "weight_matching",
    "weighted",
    "average",
    "none",
]
# which neuron descriptors each merge aligns with (empty: no alignment)
_ALIGN_WITH = {
    "aligned": ("activations", "weights"),
    "activations": ("activations",),
    "weights": ("weights",),
    "weight_matching": ("raw",),
}


class ExpertMergingModifier(ExpertReductionModifier):
    """
    Shared engine of the merging methods: per MoE layer, choose ``k`` centroids,
    group every other expert with one of them, align each member's neurons to its
    centroid, and replace the centroid by the weighted average of its group. The
    centroid keeps its router row and score-correction bias; the other experts and
    their rows are removed. With a group-limited router (``n_group`` > 1) the same
    number of centroids is chosen in every router group and groups never cross
    router groups, so routing semantics hold.

    Extra memory per layer, independent of the number of calibration tokens:
    ``E*S*D*b`` for the activation samples (``S`` = ``max_activation_tokens``,
    ``D`` the expert width, ``b`` bytes of the weights' dtype), ``8*E*(H+E+5)``
    bytes of fp64 sums, one copy of the layer's expert weights while merging, and
    ``8*(3H)^2`` bytes for the PCA covariance.

    :param group_size: most experts per group (0: unbounded)
    :param saliency: the expert score (:mod:`ream_modifiers.methods.saliency`)
        that ranks centroids (REAM grouping) or dominant experts (M-SMoE grouping)
        and, with ``merge_coefficients: saliency``, weights the average
    :param grouping: ``ream`` (pseudo-pruning), ``hcsmoe`` (average linkage on mean
        outputs) or ``mcsmoe`` (frequency-dominant experts, logit similarity)
    :param merge: ``aligned`` (activations + PCA weight descriptors), ``weights``,
        ``activations``, ``weight_matching`` (raw weights, M-SMoE), ``weighted``
        (no alignment), ``average`` (plain mean, no alignment) or ``none`` (keep
        the centroid only: saliency pruning)
    :param merge_coefficients: ``saliency`` or ``frequency`` weights of the average
    :param merge_distance: REAM grouping only: a member whose distance D to its
        centroid exceeds this is removed (pruned) instead of merged; None merges
        every member
    :param verify_merges: keep a group's merge only where, on the sampled
        calibration tokens (``max_activation_tokens`` of them), the compressed
        layer's routed output is closer (squared error) to the original layer's
        with the merged expert than with the centroid left as it is; otherwise
        the members are pruned. Costs ``capacity * H`` stored inputs and one
        replay of the layer on them
    :param gated_similarity: compare mean outputs weighted by the routing
        probability (REAM) instead of plain mean outputs (HC-SMoE)
    :param logit_similarity: add router-logit similarity to the REAM distance
    :param max_activation_tokens: neuron-activation samples kept per expert
    :param pca_dim: dimension of the PCA weight descriptor
    :param seed: seed of the activation-token sampling
    """

    requires_calibration_data: bool = True

    group_size: int = 16
    saliency: Saliency = "ream"
    grouping: Grouping = "ream"
    merge: Merge = "aligned"
    merge_coefficients: Literal["saliency", "frequency"] = "saliency"
    merge_distance: float | None = None
    verify_merges: bool = False
    gated_similarity: bool = True
    logit_similarity: bool = True
    max_activation_tokens: int = 4096
    pca_dim: int = 64
    seed: int = 42

    @model_validator(mode="after")
    def _validate_merging_fields(self):
        if self.group_size < 0 or self.group_size == 1:
            raise ValueError(
                f"{type(self).__name__}: group_size must be 0 (unbounded) or >= 2, "
                f"got {self.group_size}"
            )
        if self.merge_distance is not None and not 0.0 <= self.merge_distance <= 1.0:
            raise ValueError(
                f"{type(self).__name__}: merge_distance is a REAM distance in "
                f"[0, 1], got {self.merge_distance} (None merges every member)"
            )
        if self.max_activation_tokens < 1 or self.pca_dim < 1:
            raise ValueError(
                f"{type(self).__name__}: max_activation_tokens and pca_dim must be "
                "positive"
            )
        return self

    # -- statistics ------------------------------------------------------------

    @property
    def _uses_activations(self) -> bool:
        return "activations" in _ALIGN_WITH.get(self.merge, ())

    def statistics(self, layer: MoELayer) -> list:
        probabilities = needs_probabilities(self.saliency)
        stats = [
            RoutedExpertSums(layer.num_experts, probabilities=probabilities),
            MeanExpertOutput(layer.num_experts, gated=self.gated_similarity),
        ]
        if self.grouping == "mcsmoe" or (
            self.grouping == "ream" and self.logit_similarity
        ):
            stats.append(RouterLogitGram(layer.num_experts))
        if self._uses_activations:
            width = layer.expert(0).down_proj.in_features
            stats.append(
                ActivationSamples(
                    layer.num_experts, width, self.max_activation_tokens, self.seed
                )
            )
        if self.verify_merges and self.merge != "none":
            hidden = layer.router_weight.shape[-1]
            stats.append(
                InputSamples(hidden, self.max_activation_tokens, seed=self.seed)
            )
        return stats

    def validate_model(self, state: State, layers: list[MoELayer]) -> None:
        if self.grouping == "ream":
            check_group_capacity(
                len(layers[0].router_groups()[0]),
                self._budget.kept_per_router_group,
                self.group_size,
            )
        if layers[0].router_bias is not None and self.merge != "none":
            logger.warning(
                f"{self.method}: the router has a logit bias; merged experts keep "
                "their centroid's bias entry"
            )

    def on_calibration_start(self, state: State, event: Event, **kwargs):
        if not get_calibrate_all_experts_flag():
            raise ValueError(
                f"{self.method} needs every expert's output on every calibration "
                "token (mean outputs, neuron activations): run oneshot with "
                "moe_calibrate_all_experts=True (the default)"
            )
        super().on_calibration_start(state, event, **kwargs)

    # -- decision --------------------------------------------------------------

    def _groups(self, layer: MoELayer, collector: LayerStatsCollector) -> Groups:
        sums = collector["routed"].tensors
        kept_per_partition = self._budget.kept_per_router_group
        mean_outputs = collector["mean_output"].mean()
        groups: Groups = {}
        for members in layer.router_groups():
            if self.grouping == "hcsmoe":
                found = hierarchical_groups(mean_outputs, kept_per_partition, members)
            elif self.grouping == "mcsmoe":
                similarity = collector["logit_gram"].cosine()
                found = dominant_assignment(
                    saliency(sums, self.saliency),
                    similarity,
                    kept_per_partition,
                    members,
                )
            else:
                logit_cosine = (
                    collector["logit_gram"].cosine() if self.logit_similarity else None
                )
                distance = ream_distance(mean_outputs, logit_cosine)
                found = pseudo_group(
                    saliency(sums, self.saliency),
                    distance,
                    kept_per_partition,
                    self.group_size,
                    members,
                )
                if self.merge_distance is not None:
                    found = within_distance(found, distance, self.merge_distance)
            groups.update(found)
        return groups

    def decide(
        self, layer: MoELayer, collector: LayerStatsCollector | None
    ) -> LayerDecision:
        sums = collector["routed"].tensors
        scores = saliency(sums, self.saliency)
        groups = self._groups(layer, collector)
        coefficient_scores = (
            scores if self.merge_coefficients == "saliency" else sums["count"]
        )
        # one copy of the layer's experts serves alignment and verification
        reads_weights = bool(_ALIGN_WITH.get(self.merge)) or self.verify_merges
        merges = self.merge != "none" and any(groups.values())
        weights = layer.stacked_weights() if merges and reads_weights else None
        start = time.perf_counter()
        plan = self._merge_plan(collector, groups, coefficient_scores, weights)
        align_seconds = time.perf_counter() - start
        check = {}
        if self.verify_merges and plan:
            check = self._verify_merges(layer, collector, groups, plan, weights)
        merged = {str(c): m for c, m in sorted(groups.items()) if m}
        if self.merge != "none":
            verified = (
                f" ({len(check['merges_undone'])} of {len(check['merge_errors'])} "
                "proposed merges undone: no better than the centroid alone)"
                if check
                else ""
            )
            logger.info(
                f"{self.method} {layer.name}: {len(merged)} merged groups, sizes "
                f"{sorted((len(m) + 1 for m in merged.values()), reverse=True)}"
                f"{verified}, alignment {align_seconds:.2f}s"
            )
        return LayerDecision(
            kept=sorted(groups),
            scores=scores.cpu().tolist(),
            extra={
                "groups": merged,
                "coefficients": {str(c): plan[c][1] for c in sorted(plan)},
                "frequency": sums["count"].cpu().tolist(),
                "alignment_seconds": round(align_seconds, 4),
                **check,
            },
            plan=plan,
        )

    def _verify_merges(
        self,
        layer: MoELayer,
        collector: LayerStatsCollector,
        groups: Groups,
        plan: dict,
        weights: ExpertWeights,
    ) -> dict:
        """
        Replay the layer on the sampled calibration inputs; undo (in ``groups``
        and ``plan``) every merge that does not bring the routed output closer to
        the original than the centroid alone. Returns the report entries.
        """
        tokens = collector["inputs"].result()
        kept = sorted(groups)
        merged = {
            centroid: merge_group(weights, group, coefficients, perms)
            for centroid, (group, coefficients, perms) in plan.items()
        }
        errors = merge_helps(
            tokens,
            layer.route(tokens),
            layer.route(tokens, among=kept),
            kept,
            weights,
            merged,
            layer.activation(),
        )
        undone = sorted(c for c, e in errors.items() if e["merged"] >= e["centroid"])
        for centroid in undone:
            plan.pop(centroid)
            groups[centroid] = []
        return {
            "merge_errors": {str(c): e for c, e in sorted(errors.items())},
            "merges_undone": undone,
            "verify_tokens": int(tokens.shape[0]),
        }

    def _merge_plan(
        self,
        collector: LayerStatsCollector,
        groups: Groups,
        coefficient_scores: torch.Tensor,
        weights: ExpertWeights | None,
    ) -> dict[int, tuple[list[int], list[float], list | None]]:
        """
        ``{centroid: (group, coefficients, perms)}`` of every non-singleton group.

        :param weights: the layer's stacked experts (needed to align neurons)
        """
        to_merge = {c: m for c, m in groups.items() if m}
        if self.merge == "none" or not to_merge:
            return {}
        descriptors = []
        align_with = _ALIGN_WITH.get(self.merge, ())
        involved = sorted({e for c, m in to_merge.items() for e in (c, *m)})
        if "activations" in align_with:
            samples = collector["activations"].result()
            descriptors.append(activation_descriptors(samples, involved))
        if "weights" in align_with:
            descriptors.append(weight_descriptors(weights, involved, self.pca_dim))
        if "raw" in align_with:
            descriptors.append({e: neuron_rows(weights, e).float() for e in involved})
        plan = {}
        for centroid, members in sorted(to_merge.items()):
            group = [centroid, *members]
            if self.merge == "average":
                coefficients = [1.0 / len(group)] * len(group)
            else:
                coefficients = merge_coefficients(coefficient_scores, group)
            perms = None
            if descriptors:
                squared = self.merge == "weight_matching"
                perms = [None, *match_neurons(centroid, members, descriptors, squared)]
            plan[centroid] = (group, coefficients, perms)
        return plan

    # -- edit ------------------------------------------------------------------

    def apply(self, layer: MoELayer, decision: LayerDecision) -> None:
        # a private copy: the in-place writes below cannot change what is merged
        weights = layer.stacked_weights() if decision.plan else None
        self._sync_ranks()  # every rank has read before any rank writes
        for centroid, (group, coefficients, perms) in (decision.plan or {}).items():
            write_expert(
                layer, centroid, **merge_group(weights, group, coefficients, perms)
            )
        keep_experts(layer, decision.kept)


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
      ablation (all choices in :mod:`ream_modifiers.methods.saliency`);
    - router-logit similarity comes from the exact Gram matrix of all tokens'
      logits rather than stored logits; the PCA is exact rather than randomised;
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
            GPTQModifier:
              targets: [Linear]
              scheme: W4A16
              ignore: [lm_head]

    :param num_experts: experts to keep per layer (or give ``sparsity``)
    :param sparsity: share of experts to remove per layer, in (0, 1)
    :param saliency: ``ream_tokens`` by default; ``ream`` for the reference's
        averaging, ``reap`` for the REAP paper's score
    :param verify_merges: True by default; False merges every group
    """

    method: ClassVar[str] = "REAM"
    paper: ClassVar[str] = "https://arxiv.org/abs/2604.04356"

    saliency: Saliency = "ream_tokens"
    verify_merges: bool = True
