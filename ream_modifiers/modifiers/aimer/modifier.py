"""
AIMER: Absolute mean over root mean square IMportance for Expert Ranking.

https://arxiv.org/abs/2603.18492 (reference code: github.com/ZongfangLiu/AIMER)
"""

from __future__ import annotations

import time
from typing import ClassVar, Literal

from loguru import logger

from ream_modifiers.engines.selection import select_kept
from ream_modifiers.modifiers.aimer.score import aimer_score_layer
from ream_modifiers.modifiers.base import ExpertReductionModifier, LayerDecision
from ream_modifiers.moe.layer import MoELayer

__all__ = ["AIMERModifier"]


class AIMERModifier(ExpertReductionModifier):
    """
    Data-free expert pruning. Each routed expert's gate, up and down weights are
    pooled into one vector w of N entries and scored in fp32 by

        AIMER(e) = mean(|w|) / sqrt(mean(w^2)) = ||w||_1 / (sqrt(N) * ||w||_2)

    which lies in [1/sqrt(N), 1]. Per layer, the experts with the **highest**
    scores are removed: a high score means evenly spread magnitudes, a low score
    concentrated, outlier-bearing weights, which the paper keeps ("we prune
    experts with larger AIMER scores"; the official code sorts descending and
    prunes the first). ``remove: lowest`` reverses the direction, for ablations.

    The same number of experts is kept in every layer (at least top-k reachable),
    the same number per group for group-limited routers. Shared experts are never
    scored or removed. No calibration data is needed: the modifier runs in
    llm-compressor's data-free pipeline, and a following GPTQ still calibrates.

    Example recipe::

        aimer_stage:
          aimer_modifiers:
            AIMERModifier:
              sparsity: 0.5
            GPTQModifier: {targets: [Linear], scheme: W4A16, ignore: [lm_head]}

    ``num_experts`` / ``sparsity``, ``ignore``, ``report_path`` and
    ``protect_routers``: see :class:`ExpertReductionModifier`.

    :param remove: ``highest`` (the paper) or ``lowest`` scores are removed
    """

    requires_calibration_data: bool = False

    remove: Literal["highest", "lowest"] = "highest"

    method: ClassVar[str] = "AIMER"
    paper: ClassVar[str] = "https://arxiv.org/abs/2603.18492"
    paper_title: ClassVar[str] = "AIMER: Calibration-Free Task-Agnostic MoE Pruning"

    def decide(self, layer: MoELayer, stats: None) -> LayerDecision:
        start = time.perf_counter()
        scores = aimer_score_layer(layer)
        seconds = time.perf_counter() - start
        logger.info(f"AIMER {layer.name}: scored in {seconds * 1e3:.1f} ms")
        kept = select_kept(scores, self.layer_budget(layer), remove=self.remove)
        return LayerDecision(
            kept=kept,
            scores=scores.cpu().tolist(),
            extra={"scoring_seconds": round(seconds, 6)},
        )
