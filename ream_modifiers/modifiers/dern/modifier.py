"""
DERN: Dropping Experts, Recombining Neurons (EMNLP 2025 Findings).
https://arxiv.org/abs/2509.10377
"""

from __future__ import annotations

import time
from typing import ClassVar, Literal

import torch
from llmcompressor.core import State
from loguru import logger
from pydantic import Field, model_validator

from ream_modifiers.engines.saliency import Saliency, needs_probabilities, saliency
from ream_modifiers.engines.selection import select_kept
from ream_modifiers.modifiers.base import ExpertReductionModifier, LayerDecision
from ream_modifiers.modifiers.dern.recombine import (
    assign_segments,
    recombine_expert,
    router_transfer,
)
from ream_modifiers.moe.edit import keep_experts, set_router_rows, write_expert
from ream_modifiers.moe.layer import MoELayer, MoEModelError
from ream_modifiers.moe.weights import ExpertWeights
from ream_modifiers.observe.statistics import RoutedExpertSums, RoutedStatistics
from ream_modifiers.registry import Kind

__all__ = ["DERNModifier"]

Part = Literal["gate", "up", "down"]


class DERNModifier(ExpertReductionModifier):
    """
    Retraining-free expert pruning that keeps the dropped experts' useful neurons.
    Per MoE layer, at its ``SEQUENTIAL_EPOCH_END``:

    1. **Score and drop.** I_e = mean over calibration tokens of
       1[e in top-k(x)] * g_e(x), with g_e the weight the model actually applies
       to expert e (renormalised only where the model renormalises; spec D1). The
       top K experts by I_e are kept (the same number per router group).
    2. **Decompose and move.** Each dropped expert o is split into its m neuron
       segments (W_gate[i,:], W_up[i,:], W_down[:,i]); its output is exactly the
       sum of their contributions. A segment moves to the retained expert r* that
       holds its most similar neuron, c(s, r) = max_j cos(phi(s), phi(s_rj))
       (spec D3), when c >= ``similarity_threshold`` (tau); other segments are
       dropped (D4). phi concatenates the L2-normalised ``similarity_features``
       (default up and down: the paper found leaving the gate out slightly better;
       D2). Router rows: G_r += sum_o (n_{o->r} / m) * G_o, from the original
       rows (D5); score-correction biases and router logit biases stay the
       retained expert's own.
    3. **Merge.** Inside each retained expert that received segments, weighted
       spherical k-means over full [g; u; d] vectors brings it back to exactly m
       neurons: weights are the importance of each segment's source expert,
       initial centres are the m segments with the largest max|gate|, members are
       rescaled to their cluster's mean norm before the weighted mean (Eq. 11);
       ``kmeans_iters`` iterations at most, an empty cluster keeps its centre and
       centres get no extra rescaling (D6).

    The similarity search costs O(|P| * K * m^2 * h); it runs on the layer's
    device in blocks of retained experts, with at most ``block_elements``
    similarities alive at once, and its time is logged per layer. The k-means is
    deterministic (fixed initialisation); ``seed`` is recorded for provenance.
    Experts with biases (gpt-oss) are not supported.

    Example recipe::

        dern_stage:
          dern_modifiers:
            DERNModifier:
              sparsity: 0.25
              similarity_threshold: 0.6
            GPTQModifier: {targets: [Linear], scheme: W4A16, ignore: [lm_head]}

    ``num_experts`` / ``sparsity``, ``ignore``, ``report_path`` and
    ``protect_routers``: see :class:`ExpertReductionModifier`.

    :param similarity_threshold: tau, the smallest cosine at which a segment moves
    :param similarity_features: segment parts compared, of gate / up / down
    :param kmeans_iters: most k-means iterations per retained expert
    :param block_elements: similarities computed at once in the segment search
    :param seed: recorded in the report (the algorithm is deterministic)
    :param saliency: the expert score that ranks experts and weights their
        segments in the k-means: ``weighted_frequency`` (default) is the paper's
        I_e, reported divided by the number of calibration tokens; any other
        name of :mod:`ream_modifiers.engines.saliency` replaces it
    """

    requires_calibration_data: bool = True

    similarity_threshold: float = 0.6
    similarity_features: list[Part] = Field(default_factory=lambda: ["up", "down"])
    kmeans_iters: int = 30
    block_elements: int = 1 << 26
    seed: int = 0
    saliency: Saliency = "weighted_frequency"

    method: ClassVar[str] = "DERN"
    kind: ClassVar[Kind] = "recombine"
    paper: ClassVar[str] = "https://arxiv.org/abs/2509.10377"
    paper_title: ClassVar[str] = (
        "Dropping Experts, Recombining Neurons: Retraining-Free Pruning for Sparse "
        "Mixture-of-Experts LLMs"
    )

    @model_validator(mode="after")
    def _validate_dern_fields(self):
        if not -1.0 <= self.similarity_threshold <= 1.0:
            raise ValueError(
                f"DERNModifier: similarity_threshold is a cosine in [-1, 1], got "
                f"{self.similarity_threshold} (the paper uses 0.6)"
            )
        if not self.similarity_features or len(set(self.similarity_features)) != len(
            self.similarity_features
        ):
            raise ValueError(
                "DERNModifier: similarity_features must list distinct parts of "
                f"gate, up, down; got {self.similarity_features}"
            )
        if self.kmeans_iters < 1 or self.block_elements < 1:
            raise ValueError(
                "DERNModifier: kmeans_iters and block_elements must be >= 1"
            )
        return self

    def validate_model(self, state: State, layers: list[MoELayer]) -> None:
        expert = layers[0].expert(0)
        family = layers[0].spec.model_type
        if getattr(expert.down_proj, "bias", None) is not None:
            raise MoEModelError(
                f"DERN cannot recombine experts with biases ({family}): a neuron's "
                "down bias is not part of any segment"
            )
        if (
            "gate" in self.similarity_features
            and getattr(expert, "gate_proj", None) is None
        ):
            raise MoEModelError(
                "DERN: similarity_features names 'gate' but these experts are not gated"
            )

    def statistics(self, layer: MoELayer) -> RoutedStatistics:
        probabilities = needs_probabilities(self.saliency)
        return RoutedStatistics(
            RoutedExpertSums(layer.num_experts, probabilities=probabilities)
        )

    def importance(self, sums: dict[str, torch.Tensor], top_k: int) -> torch.Tensor:
        """
        The configured saliency; the paper's I_e (``weighted_frequency``) is the
        sum of routed weights / number of tokens (each token routes top_k).
        """
        scores = saliency(sums, self.saliency)
        if self.saliency != "weighted_frequency":
            return scores
        return scores / (sums["count"].sum() / top_k).clamp(min=1)

    def decide(self, layer: MoELayer, stats: RoutedStatistics) -> LayerDecision:
        sums = stats.routed.tensors
        importance = self.importance(sums, layer.routing.top_k)
        kept = select_kept(importance, self.layer_budget(layer), remove="lowest")
        dropped = [e for e in range(layer.num_experts) if e not in kept]
        start = time.perf_counter()
        weights = layer.stacked_weights()
        transfers: dict[int, list[tuple[int, int]]] = {}
        for part in layer.router_groups():  # segments never cross router groups
            transfers.update(
                assign_segments(
                    weights,
                    [e for e in dropped if e in part],
                    [e for e in kept if e in part],
                    self.similarity_threshold,
                    self.similarity_features,
                    self.block_elements,
                )
            )
        seconds = time.perf_counter() - start
        width = weights.down.shape[-1]
        moved = sum(len(v) for v in transfers.values())
        logger.info(
            f"DERN {layer.name}: moved {moved}/{len(dropped) * width} segments of "
            f"{len(dropped)} dropped experts (similarity search {seconds:.2f}s)"
        )
        return LayerDecision(
            kept=kept,
            scores=importance.cpu().tolist(),
            extra={
                "segments_received": {str(r): len(v) for r, v in transfers.items()},
                "router_shares": {
                    str(r): {str(o): share for o, share in shares.items()}
                    for r, shares in router_transfer(transfers, width).items()
                },
                "similarity_seconds": round(seconds, 4),
                "seed": self.seed,
            },
            plan={"transfers": transfers, "importance": importance.cpu()},
        )

    def read(
        self, layer: MoELayer, decision: LayerDecision
    ) -> tuple[ExpertWeights, torch.Tensor]:
        # private copies: the writes below cannot change what is recombined
        return layer.stacked_weights(), layer.router_weight.detach().clone()

    def write(
        self,
        layer: MoELayer,
        decision: LayerDecision,
        read: tuple[ExpertWeights, torch.Tensor],
    ) -> None:
        transfers = decision.plan["transfers"]
        importance = decision.plan["importance"]
        weights, rows = read
        original = rows.float().clone()
        width = weights.down.shape[-1]
        start = time.perf_counter()
        for target, received in transfers.items():
            new = recombine_expert(
                weights, target, received, importance, self.kmeans_iters
            )
            if new is not None:
                write_expert(layer, target, **new)
        for target, shares in router_transfer(transfers, width).items():
            for source, share in shares.items():
                rows[target] += (share * original[source]).to(rows.dtype)
        set_router_rows(layer, rows)
        keep_experts(layer, decision.kept)
        logger.info(
            f"DERN {layer.name}: recombined in {time.perf_counter() - start:.2f}s"
        )
