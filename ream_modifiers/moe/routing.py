"""
Routing semantics of an MoE layer: how router logits become top-k experts and the
weights that multiply their outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PretrainedConfig

from ream_modifiers.moe.architectures import MoEArchSpec, Scoring, text_config

__all__ = ["RoutingSpec"]


@dataclass(frozen=True)
class RoutingSpec:
    """
    Routing rules of one MoE family, resolved against a concrete config.

    :param num_experts: routed experts per layer
    :param top_k: experts selected per token
    :param scoring: ``softmax`` over all experts or per-expert ``sigmoid``
    :param renormalize: whether the selected weights are rescaled to sum to one
    :param n_group: number of expert groups for group-limited routing, else None
    :param topk_group: groups a token may draw experts from
    :param group_score: ``top2_sum`` (DeepSeek-V3) or ``max`` (DeepSeek-V2)
    :param scaling_factor: constant multiplying the routed weights
    :param sparsemixer_eps: sparsemixer's relative logit margin
    """

    num_experts: int
    top_k: int
    scoring: Scoring = "softmax"
    renormalize: bool = True
    n_group: int | None = None
    topk_group: int | None = None
    group_score: str = "top2_sum"
    scaling_factor: float = 1.0
    sparsemixer_eps: float = 0.01

    @classmethod
    def from_config(cls, config: PretrainedConfig, spec: MoEArchSpec) -> RoutingSpec:
        config = text_config(config)
        scoring = spec.scoring
        if spec.scoring_key is not None:
            scoring = getattr(config, spec.scoring_key, None) or scoring
            if scoring not in ("softmax", "sigmoid"):
                raise ValueError(
                    f"{spec.model_type}: config `{spec.scoring_key}: {scoring}` is "
                    "not a scoring the routing rules know (softmax or sigmoid)"
                )
        renormalize = spec.renormalize
        if spec.renormalize_key is not None:
            renormalize = bool(getattr(config, spec.renormalize_key, renormalize))
        if spec.topk_before_scoring and scoring == "softmax":
            renormalize = True  # a softmax over the k chosen logits sums to 1
        # a single group, or groups the router ignores, is plain top-k routing
        n_group, topk_group = spec.groups(lambda key: getattr(config, key, None))
        scaling = 1.0
        if spec.scaling_factor_key is not None:
            scaling = float(getattr(config, spec.scaling_factor_key, 1.0) or 1.0)
        eps = cls.sparsemixer_eps
        if spec.sparsemixer_eps_key is not None:
            eps = float(getattr(config, spec.sparsemixer_eps_key, eps))
        return cls(
            num_experts=int(getattr(config, spec.num_experts_key)),
            top_k=int(getattr(config, spec.top_k_key)),
            scoring=scoring,
            renormalize=renormalize,
            n_group=n_group,
            topk_group=topk_group,
            group_score=spec.group_score,
            scaling_factor=scaling,
            sparsemixer_eps=eps,
        )

    @property
    def group_size(self) -> int | None:
        return None if self.n_group is None else self.num_experts // self.n_group

    def reachable_experts(self, kept_per_layer: int) -> int:
        """
        How many experts one token can still choose from when ``kept_per_layer``
        experts remain, split evenly across groups.
        """
        if self.n_group is None:
            return kept_per_layer
        return self.topk_group * (kept_per_layer // self.n_group)

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """
        Per-expert routing probabilities in fp32, before selection (for
        sparsemixer, the softmax over all logits: its weights are softmaxes over
        subsets of them, so this is the distribution they are drawn from).
        """
        logits = logits.float()
        if self.scoring == "sigmoid":
            return logits.sigmoid()
        return logits.softmax(dim=-1)

    @torch.no_grad()
    def route(
        self, logits: torch.Tensor, correction_bias: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Reproduce the model's top-k selection.

        :param logits: ``[tokens, num_experts]`` router logits
        :param correction_bias: selection-only bias (DeepSeek-V3 style), or None
        :return: ``(top_k_index, top_k_weights)``, weights in fp32 as the model
            applies them to the expert outputs
        """
        if self.scoring == "sparsemixer":
            return self._sparsemixer(logits.float())
        scores = self.scores(logits)
        choice = scores if correction_bias is None else scores + correction_bias
        if self.n_group is not None:
            choice = self._mask_groups(choice)
        index = torch.topk(choice, self.top_k, dim=-1).indices
        weights = scores.gather(-1, index)
        if self.renormalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return index, weights * self.scaling_factor

    def _sparsemixer(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """
        PhiMoE's inference routing (arXiv 2409.12136): the k-th expert is the
        k-th largest logit; its weight is its softmax among the logits not yet
        taken whose gap to it, relative to max(|logit|, its logit), is at most
        ``2 * eps``.
        """
        remaining = logits
        indices, weights = [], []
        for _ in range(self.top_k):
            top, index = remaining.max(dim=-1, keepdim=True)
            margin = logits.abs().clamp(min=top)
            outside = (top - logits) / margin > 2 * self.sparsemixer_eps
            gates = remaining.masked_fill(outside, float("-inf")).softmax(dim=-1)
            indices.append(index)
            weights.append(gates.gather(-1, index))
            remaining = remaining.scatter(-1, index, float("-inf"))
        return torch.cat(indices, dim=-1), torch.cat(weights, dim=-1)

    def _mask_groups(self, choice: torch.Tensor) -> torch.Tensor:
        grouped = choice.view(*choice.shape[:-1], self.n_group, -1)
        if self.group_score == "max":
            group_scores = grouped.max(dim=-1).values
        else:
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
        keep = torch.topk(group_scores, self.topk_group, dim=-1).indices
        mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(-1, keep, True)
        mask = mask.unsqueeze(-1).expand_as(grouped).reshape(choice.shape)
        return choice.masked_fill(~mask, float("-inf"))
