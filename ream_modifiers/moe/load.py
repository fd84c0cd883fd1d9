"""Loading MoE checkpoints with linearized (per-expert ``nn.Linear``) experts."""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator

import torch
from llmcompressor.modeling.moe.linearize import linearize_moe
from loguru import logger
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.conversion_mapping import (
    get_checkpoint_conversion_mapping,
    register_checkpoint_conversion_mapping,
)
from transformers.core_model_loading import WeightRenaming
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.monkey_patching import clear_patch_mapping

from ream_modifiers.moe.architectures import get_arch_spec, text_config
from ream_modifiers.moe.conversions import (
    fused_save_conversions,
    per_expert_checkpoints,
    register_kimi_k2_mapping,
)

__all__ = ["load_moe_model", "load_context_available", "ensure_hub_save_names"]

# Checkpoint model types transformers does not know, and the native family whose
# classes load them.
_LOAD_AS = {"kimi_k2": "deepseek_v3"}

# importing the package is enough for a plain from_pretrained of Kimi-K2
register_kimi_k2_mapping()


def ensure_hub_save_names(model: PreTrainedModel) -> None:
    """
    Make ``save_pretrained`` write a linearized model's experts under the hub's
    names where llm-compressor has no mapping for the family: Mixtral would
    otherwise be saved as ``mlp.experts.{i}.gate_proj``, which neither
    transformers nor vLLM load, and gpt-oss per expert although its hub layout
    is fused. Call it again once quantization schemes are attached: quantized
    gpt-oss experts stay per expert (compressed-tensors packs each ``Linear``).
    """
    spec = get_arch_spec(model.config)
    if spec.fused_on_disk:
        model._weight_conversions = (
            [] if _experts_quantized(model) else fused_save_conversions()
        )
    elif spec.linear_save_renames:
        model._weight_conversions = [
            WeightRenaming(disk, memory) for disk, memory in spec.linear_save_renames
        ]


def _experts_quantized(model: PreTrainedModel) -> bool:
    from llmcompressor.modeling.moe.linear_experts import ExpertMLP

    return any(
        getattr(linear, "quantization_scheme", None) is not None
        for module in model.modules()
        if isinstance(module, ExpertMLP)
        for linear in module.children()
    )


def load_context_available() -> bool:
    """
    llm-compressor's ``load_context()`` makes transformers scan every model module
    for patches, which imports torchvision; CPU-only machines often lack it.
    """
    return importlib.util.find_spec("torchvision") is not None


def load_moe_model(
    model_id: str | os.PathLike,
    dtype: torch.dtype | str = "auto",
    use_load_context: bool | None = None,
    trust_remote_code: bool = False,
    **kwargs,
) -> PreTrainedModel:
    """
    Load a causal-LM MoE checkpoint with its experts linearized, and refuse to
    return a model whose checkpoint left weights uninitialised.

    The efficient path is llm-compressor's ``load_context()``, which loads per-expert
    checkpoint tensors straight into ``LinearExperts2D``. Without it (see
    :func:`load_context_available`), the model is loaded fused and linearized
    afterwards; the resulting module structure is the same.

    :param model_id: local path or hub ID
    :param dtype: torch dtype of the weights (``"auto"`` keeps the checkpoint's)
    :param use_load_context: force (True) or skip (False) ``load_context()``;
        by default it is used where available
    :param trust_remote_code: run modelling code shipped with the checkpoint
        (only for checkpoints you trust)
    :param kwargs: forwarded to ``from_pretrained``
    :raises ValueError: if checkpoint tensors are missing for model weights
    """
    register_kimi_k2_mapping()
    config = _checkpoint_config(model_id, kwargs)
    if config is not None:
        # llm-compressor's load_context resolves configs through AutoConfig,
        # which does not know this model type
        kwargs["config"] = config
        use_load_context = False
    if use_load_context is None:
        use_load_context = load_context_available()
    kwargs["trust_remote_code"] = trust_remote_code
    if use_load_context:
        config = AutoConfig.from_pretrained(
            model_id, trust_remote_code=trust_remote_code
        )
        model_type = text_config(config).model_type
        original_mapping = get_checkpoint_conversion_mapping(model_type)
        try:
            from llmcompressor.utils import load_context

            with load_context():
                model = _load_checked(model_id, dtype, kwargs)
            return _linearized(model)
        except ImportError as error:
            # load_context registered class patches and a load-time conversion
            # mapping before failing; undo both, or the plain load below would
            # fail the same way or silently leave the experts random
            clear_patch_mapping()
            if original_mapping is not None:
                register_checkpoint_conversion_mapping(
                    model_type, original_mapping, overwrite=True
                )
            logger.warning(
                f"load_context() failed ({error}); loading fused and linearizing "
                "after load instead"
            )
    # gpt-oss saved per expert (quantized by llm-compressor) loads too
    with per_expert_checkpoints(_model_type(model_id)):
        model = _load_checked(model_id, dtype, kwargs)
    return _linearized(model)


def _load_checked(model_id, dtype, kwargs: dict) -> PreTrainedModel:
    """
    ``from_pretrained``, refusing a checkpoint that leaves weights missing. The
    loading info is captured from transformers' finalisation step rather than
    asked for with ``output_loading_info=True``: llm-compressor's
    ``load_context()`` post-processes the returned model and would crash on the
    ``(model, info)`` tuple.
    """
    with _captured_loading_info() as infos:
        model = AutoModelForCausalLM.from_pretrained(model_id, dtype=dtype, **kwargs)
    if not infos:
        logger.warning(
            f"{model_id}: transformers reported no loading info; missing weights "
            "cannot be checked"
        )
    _check_loading_info(model_id, infos[-1] if infos else {})
    return model


def _model_type(model_id) -> str | None:
    try:
        config_dict, _ = PretrainedConfig.get_config_dict(model_id)
    except OSError:
        return None
    return config_dict.get("model_type")


def _checkpoint_config(model_id, kwargs: dict):
    """
    The config of a checkpoint whose ``model_type`` transformers does not know
    but whose native family loads it (Kimi-K2 -> DeepSeek-V3), keeping its
    ``model_type`` so that the matching conversion mapping applies; else None.
    """
    if kwargs.get("config") is not None:
        return None
    try:
        config_dict, _ = PretrainedConfig.get_config_dict(model_id)
    except OSError:
        return None  # let from_pretrained raise its own error
    native = _LOAD_AS.get(config_dict.get("model_type"))
    if native is None:
        return None
    config_class = CONFIG_MAPPING[native]
    logger.info(
        f"{model_id}: model_type {config_dict['model_type']!r} is loaded with "
        f"{config_class.__name__}"
    )
    return config_class.from_pretrained(model_id)


def _linearized(model: PreTrainedModel) -> PreTrainedModel:
    linearize_moe(model)
    ensure_hub_save_names(model)
    return model


@contextlib.contextmanager
def _captured_loading_info() -> Iterator[list[dict]]:
    """Record the loading info (missing/unexpected keys) of every model that
    transformers finishes loading inside the block."""
    infos: list[dict] = []
    original = PreTrainedModel.__dict__["_finalize_model_loading"]  # staticmethod

    def finalize(model, load_config, loading_info):
        result = original.__func__(model, load_config, loading_info)
        infos.append(result.to_dict())
        return result

    PreTrainedModel._finalize_model_loading = staticmethod(finalize)
    try:
        yield infos
    finally:
        PreTrainedModel._finalize_model_loading = original


def _check_loading_info(model_id, info: dict) -> None:
    missing = [k for k in info.get("missing_keys", []) if "rotary" not in k]
    if missing:
        raise ValueError(
            f"{model_id}: {len(missing)} model weights are missing from the "
            f"checkpoint (e.g. {sorted(missing)[:3]}) and would be random. Is the "
            "checkpoint's model_type registered with transformers (for Kimi-K2, "
            "register the deepseek_v3 conversion mapping for kimi_k2)?"
        )
