"""
ERNIE-4.5-VL's two expert sets per MoE layer.

Each MoE layer's ``mlp`` holds a text and a vision sparse block (``text_moe``,
``vision_moe``), each with ERNIE-4.5's router and selection bias and its own
experts; tokens reach one or the other by ``moe_mm_token_type_ids``. Both sets
have one count (the config's ``moe_num_experts``, which vLLM asserts equal for
both) and their own width (``moe_intermediate_size`` is ``[text, vision]``).
Every sub-block is an MoE layer here; a uniform budget keeps both sets equal.

- llm-compressor sizes linearized experts from the config's scalar width, which
  is a list here: :class:`SetWidthExperts` takes the width from the fused
  module it replaces.
- The hub stores both sets as one list per layer, ``mlp.experts.{0..2E-1}``
  (text first), which transformers splits in half on load and vLLM at
  ``moe_num_experts[0]``. transformers' save writes that list only from its
  fused experts; linearized ones get renames that put set ``k``'s expert ``i``
  at ``k * E + i`` for the current count ``E``
  (:func:`expert_set_save_conversions`), beside transformers' own converters
  of the gates (``[H, E]`` on disk) and the stacked selection bias.
- vLLM reads the hub's top-level ``moe_num_experts`` list, one count per set
  (:func:`ream_modifiers.moe.saved_config.expert_set_counts`).
"""

from __future__ import annotations

import torch
from llmcompressor.modeling.moe.linear_experts import LinearExperts2D
from transformers import PreTrainedModel
from transformers.conversion_mapping import get_checkpoint_conversion_mapping
from transformers.core_model_loading import WeightRenaming, WeightTransform
from transformers.models.ernie4_5_vl_moe.modeling_ernie4_5_vl_moe import (
    Ernie4_5_VLMoeMoeExperts,
)

from ream_modifiers.moe.architectures import MoEArchSpec, text_config

__all__ = [
    "expert_set_save_conversions",
    "register_set_width_experts",
]


class _WidthView:
    """A config whose ``moe_intermediate_size`` is one expert set's width;
    every other attribute is the config's (also for repacking to the fused
    class, which llm-compressor builds from the config it was given)."""

    def __init__(self, config, width: int):
        self._config = config
        self.moe_intermediate_size = width

    def __getattr__(self, name: str):
        return getattr(self._config, name)


def _set_width_class(base: type[LinearExperts2D]) -> type[LinearExperts2D]:
    class SetWidthExperts(base):
        """Linearized experts of one ERNIE-4.5-VL expert set, sized from the
        fused module (its ``intermediate_dim``)."""

        @classmethod
        @torch.no_grad()
        def from_experts_module(cls, experts, config):
            view = _WidthView(config, experts.intermediate_dim)
            return super().from_experts_module(experts, view)

    return SetWidthExperts


def register_set_width_experts() -> None:
    """Make llm-compressor linearize ERNIE-4.5-VL's experts with each set's
    own width (idempotent; also for its own post-load linearization inside
    ``oneshot``)."""
    current = LinearExperts2D.get_linear_experts_cls(Ernie4_5_VLMoeMoeExperts)
    if current.__name__ != "SetWidthExperts":
        LinearExperts2D._registry[Ernie4_5_VLMoeMoeExperts] = _set_width_class(current)


def expert_set_save_conversions(
    model: PreTrainedModel, spec: MoEArchSpec
) -> list[WeightTransform]:
    """
    For ``model._weight_conversions`` (the load direction; a save applies the
    reverse): each linearized set's experts renamed into the hub's one list per
    layer at the model's current count, then transformers' own mapping for the
    family (gates, bias, the language model's and the towers' renames).
    """
    count = getattr(text_config(model.config), spec.num_experts_key)
    block, experts = spec.hub_block_attr or "mlp", spec.experts_attr
    first, *others = spec.expert_sets
    renames = [
        WeightRenaming(
            rf"\.{block}\.{experts}\.{offset * count + index}\.",
            f".{block}.{name}.{experts}.{index}.",
        )
        for offset, name in enumerate(others, start=1)
        for index in range(count)
    ]
    # the first set keeps its indices
    renames.append(
        WeightRenaming(
            rf"\.{block}\.{experts}\.(\d+)\.", rf".{block}.{first}.{experts}.\1."
        )
    )
    own = get_checkpoint_conversion_mapping(model.config.model_type) or []
    return renames + list(own)
