"""
vLLM plugin (entry point ``vllm.general_plugins``): serves checkpoints whose
MoE layers keep different numbers of experts (``budget`` other than uniform).

vLLM builds every MoE layer from the one expert count in the config. With
ream-modifiers installed in vLLM's environment, vLLM loads this plugin in each
of its processes, and the decoder layers of the families in
:data:`~ream_modifiers.moe.per_layer.PER_LAYER_FAMILIES` are then built with
their own layer's count whenever the model's config lists
``num_experts_per_layer``; every other model is built exactly as before. The
weights then load as vLLM's own loader maps them: a layer's checkpoint names
only its own experts.

Installing the package without its dependencies is enough here (vLLM pins its
own transformers): ``pip install --no-deps ream-modifiers``. This module
imports vLLM and the standard library only.
"""

from __future__ import annotations

import logging

from ream_modifiers.moe.per_layer import (
    PER_LAYER_FAMILIES,
    counting_init,
    decoder_index,
    resolve_class,
)

__all__ = ["register"]

_log = logging.getLogger(__name__)


def register() -> None:
    """Wrap the supported families' vLLM decoder layers (idempotent)."""
    for model_type, family in PER_LAYER_FAMILIES.items():
        try:
            cls = resolve_class(family.vllm_layer)
        except (ImportError, AttributeError) as error:  # another vLLM version
            _log.warning(
                f"ream-modifiers: per-layer expert counts unavailable for "
                f"{model_type} ({family.vllm_layer}: {error})"
            )
            continue
        if getattr(cls.__init__, "builds_per_layer", False):
            continue
        cls.__init__ = counting_init(
            cls.__init__, family.count_attr, _text_config, _layer_index
        )


def _text_config(args: tuple, kwargs: dict):
    """The text config of the model vLLM is building (set while it builds)."""
    from vllm.config import get_current_vllm_config

    try:
        return get_current_vllm_config().model_config.hf_text_config
    except (AssertionError, AttributeError):  # no model being built: as it is
        return None


def _layer_index(args: tuple, kwargs: dict) -> int | None:
    prefix = kwargs.get("prefix")
    if prefix is None:  # positional: the one string argument naming a layer
        prefix = next((a for a in args if isinstance(a, str) and "layers." in a), "")
    return decoder_index(prefix)
