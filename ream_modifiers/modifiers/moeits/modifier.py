"""
MoEITS: information-theoretic simplification of MoE LLMs.
https://arxiv.org/abs/2604.10603 (reference code: github.com/luisbalru/MoEITS)
"""

from __future__ import annotations

import time
from typing import ClassVar

from llmcompressor.core import State
from loguru import logger
from pydantic import Field, model_validator

from ream_modifiers.modifiers.base import ExpertReductionModifier, LayerDecision
from ream_modifiers.modifiers.moeits.nmi import greedy_removal, iqr_threshold, layer_nmi
from ream_modifiers.moe.layer import MoELayer

__all__ = ["MoEITSModifier"]


class MoEITSModifier(ExpertReductionModifier):
    """
    Data-free expert pruning by redundancy. For every pair of experts (i, j) in a
    layer and every projection p, the flattened weights give paired samples whose
    normalised mutual information is estimated with histograms:

        NMI(A, B) = (H(A) + H(B) - H(A, B)) / sqrt(H(A) H(B))
        M_ij = sum_p alpha_p NMI(W_p^i, W_p^j)      (symmetric, zero diagonal)

    Then, greedily: take the most redundant pair (largest M_ij) and remove the one
    of the two with the higher mean M to the remaining experts.

    By default the loop stops at a fixed count per layer (``num_experts`` /
    ``sparsity``), the variant of the reference's fixed-count branch, because vLLM
    needs one expert count for all layers; with group-limited routers it runs
    inside each router group. ``allow_nonuniform: true`` restores the paper's
    adaptive stop, while max(M) > tau = mean(M) + ``lambda_iqr`` * IQR(M) (over all
    E^2 entries, diagonal included), never below top-k; the checkpoint then has
    different counts per layer, which neither vLLM nor transformers can load.

    Choices: histograms use ``bins`` uniform bins per marginal over each expert's
    own range (the reference's numpy ``bins='auto'`` gives thousands of bins for
    millions of weights, which biases the estimate upwards and cannot be
    vectorised); the matrix is symmetrised (spec M6); ties remove the first
    argmax pair's second expert (M7). The paper's LoRA "healing" afterwards is
    training, not one-shot compression, and is not part of this modifier.

    Cost: O(E^2 * h * m) per projection, vectorised on the layer's device (one
    ``bincount`` per expert and block of partners), plus an O(E^3) greedy loop;
    the time is logged per layer.

    Example recipe::

        moeits_stage:
          moeits_modifiers:
            MoEITSModifier: {sparsity: 0.25, bins: 64}
            GPTQModifier: {targets: [Linear], scheme: W4A16, ignore: [lm_head]}

    ``num_experts`` / ``sparsity``, ``ignore``, ``report_path`` and
    ``protect_routers``: see :class:`ExpertReductionModifier`.

    :param bins: histogram bins per marginal
    :param projection_weights: alpha per projection (the reference's Qwen and
        DeepSeek weights; use 1/3 each for its Mixtral setting)
    :param allow_nonuniform: use the adaptive threshold (non-uniform counts)
    :param lambda_iqr: lambda of the adaptive threshold
    """

    requires_calibration_data: bool = False

    bins: int = 64
    projection_weights: dict[str, float] = Field(
        default_factory=lambda: {"gate": 0.2, "up": 0.4, "down": 0.4}
    )
    allow_nonuniform: bool = False
    lambda_iqr: float = 2.5

    method: ClassVar[str] = "MoEITS"
    paper: ClassVar[str] = "https://arxiv.org/abs/2604.10603"
    paper_title: ClassVar[str] = "MoEITS: A Green AI approach for simplifying MoE-LLMs"

    @model_validator(mode="after")
    def _validate_moeits_fields(self):
        if self.bins < 2:
            raise ValueError(f"MoEITSModifier: bins must be >= 2, got {self.bins}")
        unknown = set(self.projection_weights) - {"gate", "up", "down"}
        if unknown or any(w < 0 for w in self.projection_weights.values()):
            raise ValueError(
                "MoEITSModifier: projection_weights maps gate / up / down to weights "
                f">= 0, got {self.projection_weights}"
            )
        if not any(self.projection_weights.values()):
            raise ValueError("MoEITSModifier: projection_weights are all zero")
        return self

    def uniform_budget(self) -> bool:
        return not self.allow_nonuniform

    def validate_model(self, state: State, layers: list[MoELayer]) -> None:
        if self.allow_nonuniform:
            logger.warning(
                "MoEITS with allow_nonuniform: layers will keep different numbers of "
                "experts; vLLM (and transformers) cannot load the result"
            )

    def decide(self, layer: MoELayer, stats: None) -> LayerDecision:
        start = time.perf_counter()
        weights = layer.stacked_weights()
        matrices = {
            name: tensor
            for name in ("gate", "up", "down")
            if (tensor := getattr(weights, name)) is not None
        }
        matrix = layer_nmi(matrices, self.projection_weights, self.bins)
        extra = {"nmi_seconds": round(time.perf_counter() - start, 4)}
        top_k = layer.routing.top_k
        if self.allow_nonuniform:
            threshold = iqr_threshold(matrix, self.lambda_iqr)
            kept = greedy_removal(
                matrix, range(layer.num_experts), threshold=threshold, min_keep=top_k
            )
            extra["threshold"] = threshold
        else:
            per_part = self.layer_budget(layer).kept_per_router_group
            kept = []
            for members in layer.router_groups():
                kept += greedy_removal(matrix, members, keep=per_part)
        logger.info(
            f"MoEITS {layer.name}: NMI matrix of {layer.num_experts} experts in "
            f"{extra['nmi_seconds']:.2f}s"
        )
        return LayerDecision(
            kept=kept,
            scores=matrix.mean(dim=1).cpu().tolist(),
            extra={
                **extra,
                "nmi": [[round(v, 5) for v in row] for row in matrix.tolist()],
            },
        )
