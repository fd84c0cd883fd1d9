"""Which transformers auto class builds a checkpoint's whole model."""

from __future__ import annotations

from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    PretrainedConfig,
)
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
)

__all__ = ["auto_model_class", "is_multimodal"]


def is_multimodal(config: PretrainedConfig) -> bool:
    """
    Whether ``config`` is a vision-language wrapper (Qwen3-VL-MoE, GLM-4.5V,
    Qwen3.5-MoE with its ``vision_config``): its model is built with the vision
    tower, which is kept as it is. transformers also maps some wrappers
    (Qwen3.5-MoE, Llama-4) to a text-only causal LM, which would drop the
    tower from the saved checkpoint.
    """
    wrapper = MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.get(config.model_type)
    text_model = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
    if wrapper is None:
        return False
    return text_model is None or getattr(config, "vision_config", None) is not None


def auto_model_class(
    config: PretrainedConfig,
) -> type[AutoModelForCausalLM] | type[AutoModelForImageTextToText]:
    """The auto class whose ``from_pretrained``/``from_config`` builds ``config``."""
    return (
        AutoModelForImageTextToText if is_multimodal(config) else AutoModelForCausalLM
    )
