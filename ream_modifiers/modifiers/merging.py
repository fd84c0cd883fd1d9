"""
The merging engine shared by REAM and the HC-SMoE and M-SMoE baselines: choose
centroids, group the other experts with them, align neurons and average each
group into its centroid's slot.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import ClassVar, Literal

import torch
from llmcompressor.core import State
from loguru import logger
from pydantic import model_validator

from ream_modifiers.engines.align import (
    activation_descriptor,
    match_neurons,
    neuron_rows,
    weight_pca,
)
from ream_modifiers.engines.grouping import (
    Groups,
    check_group_capacity,
    dominant_assignment,
    hierarchical_groups,
    pseudo_group,
    ream_distance,
    within_distance,
)
from ream_modifiers.engines.merge import merge_coefficients, merge_group
from ream_modifiers.engines.reproduction import merge_helps
from ream_modifiers.engines.saliency import Saliency, needs_probabilities, saliency
from ream_modifiers.modifiers.base import ExpertReductionModifier, LayerDecision
from ream_modifiers.moe.edit import keep_experts, write_expert
from ream_modifiers.moe.layer import ExpertWeights, MoELayer
from ream_modifiers.observe.statistics import (
    ActivationSamples,
    InputSamples,
    LayerStatistics,
    MeanExpertOutput,
    RoutedExpertSums,
    RouterLogitGram,
)
from ream_modifiers.registry import Kind

__all__ = [
    "ExpertMergingModifier",
    "FrequencyMergingBaseline",
    "Grouping",
    "Merge",
    "MergingStatistics",
]

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


@dataclass
class MergingStatistics(LayerStatistics):
    """What the merging engine reads per layer; settings turn the optional ones
    on (logit similarity, neuron alignment on activations, merge verification)."""

    routed: RoutedExpertSums
    mean_output: MeanExpertOutput
    logit_gram: RouterLogitGram | None = None
    activations: ActivationSamples | None = None
    inputs: InputSamples | None = None


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
    or fewer when the calibration set has fewer tokens; ``D`` the expert width,
    ``b`` bytes of the weights' dtype), ``8*E*(H+E+5)`` bytes of fp64 sums, one
    copy of the layer's expert weights while merging, ``8*(3H)^2`` bytes for the
    PCA covariance (``pca_method: exact``; ``lowrank`` holds ``3H x (pca_dim +
    16)``), and one group's neuron descriptors at a time (``4*D*S`` bytes
    per member for activations).

    :param group_size: most experts per group (0: unbounded)
    :param saliency: the expert score (:mod:`ream_modifiers.engines.saliency`)
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
    :param pca_method: its principal directions by randomised subspace
        iteration (``lowrank``, as the reference's ``torch.pca_lowrank``) or an
        exact eigendecomposition of the ``3H x 3H`` covariance (``exact``:
        ``(3H)^3`` time, 150 s a layer at Qwen3-30B-A3B's width on one CPU
        thread against 14 s)
    :param seed: seed of the activation-token sampling
    """

    requires_calibration_data: bool = True
    kind: ClassVar[Kind] = "merge"

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
    pca_method: Literal["lowrank", "exact"] = "lowrank"
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

    def statistics(self, layer: MoELayer) -> MergingStatistics:
        experts = layer.num_experts
        probabilities = needs_probabilities(self.saliency)
        stats = MergingStatistics(
            RoutedExpertSums(experts, probabilities=probabilities),
            MeanExpertOutput(experts, gated=self.gated_similarity),
        )
        if self.grouping == "mcsmoe" or (
            self.grouping == "ream" and self.logit_similarity
        ):
            stats.logit_gram = RouterLogitGram(experts)
        if self._uses_activations:
            width = layer.expert(0).down_proj.in_features
            stats.activations = ActivationSamples(
                experts, width, self.max_activation_tokens, self.seed
            )
        if self.verify_merges and self.merge != "none":
            hidden = layer.router_weight.shape[-1]
            stats.inputs = InputSamples(
                hidden, self.max_activation_tokens, seed=self.seed
            )
        return stats

    def validate_model(self, state: State, layers: list[MoELayer]) -> None:
        if self.grouping == "ream":
            check_group_capacity(
                len(layers[0].router_groups()[0]),
                # the layer keeping the fewest binds (budgets may differ)
                min(self.layer_budget(x).kept_per_router_group for x in layers),
                self.group_size,
            )
        if layers[0].router_bias is not None and self.merge != "none":
            logger.warning(
                f"{self.method}: the router has a logit bias; merged experts keep "
                "their centroid's bias entry"
            )

    # -- decision --------------------------------------------------------------

    def _groups(self, layer: MoELayer, stats: MergingStatistics) -> Groups:
        sums = stats.routed.tensors
        kept_per_partition = self.layer_budget(layer).kept_per_router_group
        mean_outputs = stats.mean_output.mean()
        groups: Groups = {}
        for members in layer.router_groups():
            if self.grouping == "hcsmoe":
                found = hierarchical_groups(mean_outputs, kept_per_partition, members)
            elif self.grouping == "mcsmoe":
                similarity = stats.logit_gram.cosine()
                found = dominant_assignment(
                    saliency(sums, self.saliency),
                    similarity,
                    kept_per_partition,
                    members,
                )
            else:
                logit_cosine = (
                    stats.logit_gram.cosine() if self.logit_similarity else None
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

    def decide(self, layer: MoELayer, stats: MergingStatistics) -> LayerDecision:
        sums = stats.routed.tensors
        scores = saliency(sums, self.saliency)
        groups = self._groups(layer, stats)
        coefficient_scores = (
            scores if self.merge_coefficients == "saliency" else sums["count"]
        )
        # one copy of the layer's experts serves alignment and verification
        reads_weights = bool(_ALIGN_WITH.get(self.merge)) or self.verify_merges
        merges = self.merge != "none" and any(groups.values())
        weights = layer.stacked_weights() if merges and reads_weights else None
        start = time.perf_counter()
        plan = self._merge_plan(stats, groups, coefficient_scores, weights)
        align_seconds = time.perf_counter() - start
        check = {}
        if self.verify_merges and plan:
            check = self._verify_merges(layer, stats, groups, plan, weights)
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
        stats: MergingStatistics,
        groups: Groups,
        plan: dict,
        weights: ExpertWeights,
    ) -> dict:
        """
        Replay the layer on the sampled calibration inputs; undo (in ``groups``
        and ``plan``) every merge that does not bring the routed output closer to
        the original than the centroid alone. Returns the report entries.
        """
        tokens = stats.inputs.result()
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
            input_weighted=layer.spec.input_weighted,
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
        stats: MergingStatistics,
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
        # descriptors are built per group, so that at most one group's are held
        # (all of a layer's activation descriptors in fp32 are twice its samples)
        describers: list[Callable[[int], torch.Tensor]] = []
        align_with = _ALIGN_WITH.get(self.merge, ())
        if "activations" in align_with:
            samples = stats.activations.result()
            describers.append(partial(activation_descriptor, samples))
        if "weights" in align_with:
            describers.append(weight_pca(weights, self.pca_dim, self.pca_method))
        if "raw" in align_with:
            describers.append(lambda expert: neuron_rows(weights, expert).float())
        plan = {}
        for centroid, members in sorted(to_merge.items()):
            group = [centroid, *members]
            if self.merge == "average":
                coefficients = [1.0 / len(group)] * len(group)
            else:
                coefficients = merge_coefficients(coefficient_scores, group)
            perms = None
            if describers:
                perms = [None, *self._align(centroid, members, describers)]
            plan[centroid] = (group, coefficients, perms)
        return plan

    def _align(
        self,
        centroid: int,
        members: list[int],
        describers: list[Callable[[int], torch.Tensor]],
    ) -> list[list[int]]:
        """Each member's neuron permutation onto the centroid; the group's
        descriptors are freed on return, before the next group's are built."""
        tables = [
            {e: describe(e) for e in (centroid, *members)} for describe in describers
        ]
        return match_neurons(centroid, members, tables, self.merge == "weight_matching")

    # -- edit ------------------------------------------------------------------

    def read(self, layer: MoELayer, decision: LayerDecision) -> ExpertWeights | None:
        # a private copy: the in-place writes cannot change what is merged
        return layer.stacked_weights() if decision.plan else None

    def write(
        self, layer: MoELayer, decision: LayerDecision, read: ExpertWeights | None
    ) -> None:
        weights = read
        for centroid, (group, coefficients, perms) in (decision.plan or {}).items():
            write_expert(
                layer, centroid, **merge_group(weights, group, coefficients, perms)
            )
        keep_experts(layer, decision.kept)


class FrequencyMergingBaseline(ExpertMergingModifier):
    """
    The settings the merging baselines (HC-SMoE, M-SMoE) share: routing
    frequency ranks experts and weights the average, mean outputs are not
    gated by the routing probability, and groups are unbounded. Subclasses set
    ``grouping`` and ``merge``.
    """

    merge_coefficients: Literal["saliency", "frequency"] = "frequency"
    saliency: Saliency = "frequency"
    gated_similarity: bool = False
    group_size: int = 0
