"""Which transformers auto class builds a checkpoint's whole model."""

from __future__ import annotations

from transformers import (
    AutoModelForCausalLM,
    AutoModelForMultimodalLM,
    PretrainedConfig,
)
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES,
)

__all__ = ["auto_model_class", "is_multimodal"]


def is_multimodal(config: PretrainedConfig) -> bool:
    """
    Whether ``config`` is a multimodal wrapper (Qwen3-VL-MoE, GLM-4.5V,
    Qwen3.5-MoE with its ``vision_config``, Qwen3-Omni): its model is built
    with the vision (and audio) towers, which are kept as they are.
    transformers also maps some wrappers (Qwen3.5-MoE, Llama-4) to a text-only
    causal LM, which would drop the tower from the saved checkpoint.
    """
    wrapper = MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES.get(config.model_type)
    text_model = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
    if wrapper is None:
        return False
    return text_model is None or getattr(config, "vision_config", None) is not None


def auto_model_class(
    config: PretrainedConfig,
) -> type[AutoModelForCausalLM] | type[AutoModelForMultimodalLM]:
    """The auto class whose ``from_pretrained``/``from_config`` builds ``config``."""
    return AutoModelForMultimodalLM if is_multimodal(config) else AutoModelForCausalLM
