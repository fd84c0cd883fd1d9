"""
MoE blocks whose router scales each expert's *input* (Llama-4): the block
computes ``sum_e f_e(s_e x)`` with ``s_e = sigmoid(logit_e)`` for the chosen
experts, where every other family computes ``sum_e s_e f_e(x)``. transformers'
``Llama4TextMoe`` runs every expert densely on all ``E x T`` scaled rows (the
unchosen ones are zero), and llm-compressor's ``Llama4LinearExperts`` keeps that
interface (and cannot be built from a text-only ``Llama4TextConfig``).

Two adaptations give such a block the interface every statistic here observes,
without changing its output:

- :class:`InputWeightedExperts`: the linearized experts called as
  ``experts(hidden_states, top_k_index, top_k_weights)``; expert ``e`` runs on
  its routed tokens scaled by their weights, and, when all experts are
  calibrated, on every token scaled by that token's score for ``e`` (what it
  would receive if chosen), so the statistics that compare experts on the same
  tokens see each expert's real input;
- :class:`InputWeightedMoeBlock`: the block routes with its own router and
  calls its experts that way (the block object and its modules are kept; only
  its class changes, so llm-compressor's and the checkpoint's module names hold).

The collector then reads ``f_e(s x) / s`` as an expert's output
(:mod:`ream_modifiers.observe.collector`): weighted by ``s``, as every method
here weights outputs, it is the expert's actual contribution ``f_e(s x)``.
"""

from __future__ import annotations

import torch
from compressed_tensors.offload import get_cache_init_kwargs, offload_module
from llmcompressor.modeling.moe.context import get_calibrate_all_experts_flag
from llmcompressor.modeling.moe.linear_experts import LinearExperts2D
from llmcompressor.modeling.moe.llama4 import Llama4LinearExperts
from llmcompressor.utils.dev import skip_weights_initialize
from torch import nn
from transformers.models.llama4.modeling_llama4 import (
    Llama4TextExperts,
    Llama4TextMoe,
)

__all__ = [
    "InputWeightedExperts",
    "InputWeightedMoeBlock",
    "adapt_input_weighted_blocks",
    "register_input_weighted_experts",
]


class InputWeightedExperts(Llama4LinearExperts):
    """Per-expert Llama-4 experts that scale each expert's input by its routing
    weight (see the module docstring)."""

    @classmethod
    @torch.no_grad()
    def from_experts_module(cls, experts: Llama4TextExperts, config):
        text = config.get_text_config()
        with skip_weights_initialize():
            self = cls(
                experts.num_experts, experts.hidden_size, experts.expert_dim, text
            )
        # Llama-4's fused layout: [E, H, 2I] with the gate in the first I columns
        experts.is_concatenated = cls.is_concatenated
        experts.is_transposed = cls.is_transposed
        experts.has_bias = cls.has_bias
        experts.has_gate = cls.has_gate
        for index in range(self.num_experts):
            self[index].copy_from_experts_module(experts, index)
        self._source_experts_cls = type(experts)
        self._source_config = text
        offload_kwargs = get_cache_init_kwargs(experts)
        for module in self.modules():
            offload_module(module, **offload_kwargs)
        return self

    def forward(
        self,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        token_scores: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        ``sum over each token's routed experts of f_e(weight * x)``.

        :param hidden_states: ``[T, H]``
        :param top_k_index: ``[T, k]`` routed experts
        :param top_k_weights: ``[T, k]`` their weights, in the input's dtype
        :param token_scores: ``[T, E]`` every token's score for every expert
            (needed when all experts are calibrated)
        """
        output = torch.zeros_like(hidden_states)
        every_token = get_calibrate_all_experts_flag()
        if every_token and token_scores is None:
            raise ValueError(
                "calibrating all experts of an input-weighted block needs every "
                "token's score for every expert (token_scores)"
            )
        with torch.no_grad():
            # [E, k, T]: slot-major per expert, the order the collector expects
            mask = nn.functional.one_hot(top_k_index, self.num_experts).permute(2, 1, 0)
        for index in range(self.num_experts):
            slot, token = torch.where(mask[index])
            expert = self[index]
            if every_token:
                scaled = hidden_states * token_scores[:, index, None]
                expert_output = expert(scaled)[token]
            else:
                weights = top_k_weights[token, slot, None]
                expert_output = expert(hidden_states[token] * weights)
            output.index_add_(0, token, expert_output.to(output.dtype))
        return output


class InputWeightedMoeBlock(Llama4TextMoe):
    """``Llama4TextMoe`` routing through the standard experts interface; the
    same output (and router logits) as the original block."""

    def forward(self, hidden_states: torch.Tensor):
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        scores, logits = self.router(hidden_states)  # both [T, E]
        top_k_index = torch.topk(logits, self.top_k, dim=-1).indices
        top_k_weights = scores.gather(1, top_k_index)
        # every token's score for every expert: sigmoid of its logit, as the
        # router scores the chosen ones
        token_scores = None
        if get_calibrate_all_experts_flag():
            token_scores = torch.sigmoid(logits.float()).to(scores.dtype)
        routed = self.experts(
            hidden_states, top_k_index, top_k_weights, token_scores=token_scores
        )
        output = self.shared_expert(hidden_states)
        output.add_(routed)
        return output, logits


_BLOCKS: dict[type[nn.Module], type[nn.Module]] = {Llama4TextMoe: InputWeightedMoeBlock}


def register_input_weighted_experts() -> None:
    """Make llm-compressor linearize Llama-4's experts into
    :class:`InputWeightedExperts` (idempotent; also for its own post-load
    linearization inside ``oneshot``)."""
    LinearExperts2D.get_registration(Llama4TextExperts)  # imports its own first
    LinearExperts2D._registry[Llama4TextExperts] = InputWeightedExperts


def adapt_input_weighted_blocks(model: nn.Module) -> int:
    """
    Give every input-weighted MoE block of ``model`` the standard experts
    interface (idempotent); returns how many blocks were adapted.

    :raises TypeError: if such a block's experts are not
        :class:`InputWeightedExperts` (linearized by another class)
    """
    adapted = 0
    for name, module in model.named_modules():
        adapter = _BLOCKS.get(type(module))
        if adapter is None:
            continue
        experts = getattr(module, "experts", None)
        if not isinstance(experts, InputWeightedExperts):
            raise TypeError(
                f"{name}.experts is {type(experts).__name__}, not "
                "InputWeightedExperts: the experts were linearized before "
                "ream_modifiers registered its Llama-4 experts class. Import "
                "ream_modifiers before loading the model, or load it with "
                "ream_modifiers.load_moe_model()"
            )
        module.__class__ = adapter
        adapted += 1
    return adapted
