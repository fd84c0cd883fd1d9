"""Loading MoE checkpoints with linearized (per-expert ``nn.Linear``) experts."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from collections.abc import Iterator

import torch
from compressed_tensors.offload.cache import OffloadCache
from compressed_tensors.utils import patch_attr
from llmcompressor.modeling.moe.conversion_mappings import (
    get_linearize_load_mappings,
    has_linearize_load_mappings,
)
from llmcompressor.modeling.moe.linear_experts import LinearExperts2D
from llmcompressor.modeling.moe.linearize import (
    get_non_linearized_moes,
    linearize_moe,
)
from loguru import logger
from transformers import (
    AutoConfig,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.conversion_mapping import (
    get_checkpoint_conversion_mapping,
    register_checkpoint_conversion_mapping,
)
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
from transformers.monkey_patching import clear_patch_mapping

from ream_modifiers.moe.architectures import (
    ARCHITECTURES,
    LOADED_AS,
    get_arch_spec,
    text_config,
    text_config_entry,
)
from ream_modifiers.moe.auto import auto_model_class
from ream_modifiers.moe.conversions import (
    fused_save_conversions,
    fused_save_conversions_outside_scope,
    hub_save_conversions,
    per_expert_checkpoints,
    register_loaded_as_mappings,
)
from ream_modifiers.moe.expert_sets import (
    expert_set_save_conversions,
    register_set_width_experts,
)
from ream_modifiers.moe.forward_module import adapt_forward_module
from ream_modifiers.moe.input_weighted import (
    adapt_input_weighted_blocks,
    register_input_weighted_experts,
)
from ream_modifiers.moe.offload import Offload, offload_load_kwargs
from ream_modifiers.moe.per_layer import (
    PER_LAYER_FAMILIES,
    PER_LAYER_KEY,
    building_per_layer,
    per_layer_counts,
    per_layer_family,
)

__all__ = ["load_moe_model", "load_context_available", "ensure_hub_save_names"]

# importing this module is enough for a plain from_pretrained of Kimi-K2
register_loaded_as_mappings()


def ensure_hub_save_names(model: PreTrainedModel) -> None:
    """
    Make ``save_pretrained`` write a linearized model's experts under the hub's
    names where llm-compressor has no mapping for the family: Mixtral would
    otherwise be saved as ``mlp.experts.{i}.gate_proj``, which neither
    transformers nor vLLM load, and gpt-oss per expert although its hub layout
    is fused; Kimi-Linear and Kimi-K2.5 also keep transformers' converters of
    their other tensors (:func:`ream_modifiers.moe.conversions.hub_save_conversions`).
    Call it again once quantization schemes are attached: quantized
    gpt-oss experts stay per expert (compressed-tensors packs each ``Linear``).
    """
    spec = get_arch_spec(model.config)
    if spec.fused_on_disk:
        model._weight_conversions = (
            [] if _experts_quantized(model) else fused_save_conversions(spec)
        )
    elif spec.linear_save_renames or spec.keep_load_converters:
        model._weight_conversions = hub_save_conversions(
            model.config.model_type, spec, linearized=True
        )
    elif spec.expert_sets:
        # ERNIE-4.5-VL: both sets back into the hub's one list per layer
        model._weight_conversions = expert_set_save_conversions(model, spec)
    elif spec.moe_scope is not None and _experts_quantized(model):
        # Qwen3-Omni's talker: its unquantized experts must be stored fused
        # for transformers to reload the quantized checkpoint
        model._weight_conversions = fused_save_conversions_outside_scope(
            _outside_scope(model, spec)
        )


def _outside_scope(model: PreTrainedModel, spec) -> list[str]:
    """Top-level modules holding linearized experts outside the row's scope."""
    return sorted(
        {
            name.split(".")[0]
            for name, module in model.named_modules()
            if isinstance(module, LinearExperts2D) and not spec.in_scope(name)
        }
    )


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
    offload: Offload = "none",
    offload_folder: str | os.PathLike | None = None,
    **kwargs,
) -> PreTrainedModel:
    """
    Load a causal-LM MoE checkpoint with its experts linearized, and refuse to
    return a model whose checkpoint left weights uninitialised.

    The efficient path is llm-compressor's ``load_context()``, which loads per-expert
    checkpoint tensors straight into ``LinearExperts2D``. Without it (see
    :func:`load_context_available`), the model is loaded fused and linearized
    afterwards; the resulting module structure is the same.

    With ``offload``, the weights stay in CPU memory or on disk in compressed-tensors'
    offloading (``load_offloaded_model``, which ``load_context()`` includes), and
    llm-compressor's sequential pipeline onloads one decoder layer at a time to the
    execution device. Without ``load_context()``, families that llm-compressor can
    load linearized (Qwen2/3-MoE, Qwen3-Next, OLMoE, DeepSeek-V3, GLM-4.5) get
    their per-expert modules built at construction, in memory or offloaded, so the
    checkpoint's tensors are used in place (disk: no copy is written; memory: no
    fused copy beside the linear one); other families are loaded fused and
    linearized layer by layer, which writes a linearized copy of the experts to
    the offload folder.

    :param model_id: local path or hub ID
    :param dtype: torch dtype of the weights (``"auto"`` keeps the checkpoint's)
    :param use_load_context: force (True) or skip (False) ``load_context()``;
        by default it is used where available
    :param trust_remote_code: run modelling code shipped with the checkpoint
        (only for checkpoints you trust)
    :param offload: ``none``, ``cpu``, ``disk`` or ``auto`` (CPU memory first,
        then disk); see :func:`ream_modifiers.moe.offload.offload_load_kwargs`
    :param offload_folder: empty or new folder for ``disk`` and ``auto``
    :param kwargs: forwarded to ``from_pretrained``
    :raises ValueError: if checkpoint tensors are missing for model weights
    :raises ream_modifiers.moe.offload.OffloadOptionError: on an offload option that
        cannot work, before anything is loaded
    """
    kwargs.update(offload_load_kwargs(offload, offload_folder, kwargs))
    register_loaded_as_mappings()
    register_input_weighted_experts()
    register_set_width_experts()
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
    return _load_with_linear_experts(model_id, dtype, kwargs, offload != "none")


def _load_with_linear_experts(
    model_id, dtype, kwargs: dict, offloaded: bool
) -> PreTrainedModel:
    """
    ``from_pretrained`` with linear experts built at construction where
    llm-compressor has a per-expert load mapping for the family (loading fused
    and linearizing afterwards held both copies of the experts at once: 1.9x the
    model's bytes while loading, BENCHMARKS.md "Memory by phase"). ``offloaded``:
    inside compressed-tensors' ``load_offloaded_model()`` (accelerate places the
    weights, then they are converted to compressed-tensors offloading).
    """
    with contextlib.ExitStack() as stack:
        # gpt-oss saved per expert (quantized by llm-compressor) loads too
        model_type = _model_type(model_id)
        stack.enter_context(
            per_expert_checkpoints(model_type, _stored_count(model_id, model_type))
        )
        direct = stack.enter_context(_linear_experts_at_construction(model_id, kwargs))
        if offloaded:
            from compressed_tensors.offload import load_offloaded_model

            stack.enter_context(load_offloaded_model())
        model = _load_checked(model_id, dtype, kwargs)
    if offloaded and not direct:
        logger.warning(
            f"{type(model).__name__}: no per-expert load mapping; linearizing the "
            "offloaded fused experts layer by layer (writes a linearized copy of the "
            "experts to the offload folder)"
        )
    return _linearized(model)


@contextlib.contextmanager
def _linear_experts_at_construction(model_id, kwargs: dict) -> Iterator[bool]:
    """
    While active, the causal-LM class of ``model_id`` builds llm-compressor's
    ``LinearExperts2D`` in place of its fused experts class, and the family's
    per-expert checkpoint names load into it (yields True); yields False, changing
    nothing, for families without a per-expert load mapping.

    This is what ``load_context()`` does, narrowed to one class: transformers'
    patch mechanism that ``load_context()`` uses scans every transformers module,
    which imports torchvision. The replacement holds only during the model's
    ``__init__``, so that transformers' weight initialisation still recognises
    the original class.
    """
    config = kwargs.get("config") or AutoConfig.from_pretrained(
        model_id, trust_remote_code=kwargs.get("trust_remote_code", False)
    )
    model_type = text_config(config).model_type
    model_cls = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    if model_cls is None or not has_linearize_load_mappings(model_type):
        yield False
        return
    experts_cls, load_mapping, _ = get_linearize_load_mappings(model_type)
    linear_cls = LinearExperts2D.get_linear_experts_cls(experts_cls)
    defining_module = sys.modules[experts_cls.__module__]
    original_init = model_cls.__init__

    def init(self, *args, **init_kwargs):
        with patch_attr(defining_module, experts_cls.__name__, linear_cls):
            original_init(self, *args, **init_kwargs)

    original_mapping = get_checkpoint_conversion_mapping(model_type)
    register_checkpoint_conversion_mapping(model_type, load_mapping, overwrite=True)
    try:
        with patch_attr(model_cls, "__init__", init):
            yield True
    finally:
        # later plain loads of the family must fuse its experts again
        register_checkpoint_conversion_mapping(
            model_type, original_mapping or [], overwrite=True
        )


def _linearize_offloaded(model: PreTrainedModel) -> None:
    """
    Linearize fused experts one layer at a time, each onloaded once (without
    ``disable_offloading`` every per-expert slice would read the whole fused
    tensor again), and drop the fused tensors' offloaded storage afterwards.
    """
    from compressed_tensors.offload import disable_offloading

    for name, fused in get_non_linearized_moes(model):
        config = getattr(fused, "config", model.config)
        linear_cls = LinearExperts2D.get_linear_experts_cls(type(fused))
        with disable_offloading():
            linear = linear_cls.from_experts_module(fused, config)
        model.set_submodule(name, linear)
        for module in fused.modules():
            if isinstance(module._parameters, OffloadCache):
                for key in list(module._parameters):
                    del module._parameters[key]  # deletes files it wrote


def _load_checked(model_id, dtype, kwargs: dict) -> PreTrainedModel:
    """
    ``from_pretrained``, refusing a checkpoint that leaves weights missing. The
    loading info is captured from transformers' finalisation step rather than
    asked for with ``output_loading_info=True``: llm-compressor's
    ``load_context()`` post-processes the returned model and would crash on the
    ``(model, info)`` tuple.
    """
    config = kwargs.get("config") or AutoConfig.from_pretrained(
        model_id, trust_remote_code=kwargs.get("trust_remote_code", False)
    )
    with _captured_loading_info() as infos, _per_layer_counts(config):
        model = auto_model_class(config).from_pretrained(
            model_id, dtype=dtype, **kwargs
        )
    if not infos:
        logger.warning(
            f"{model_id}: transformers reported no loading info; missing weights "
            "cannot be checked"
        )
    _check_loading_info(model_id, infos[-1] if infos else {})
    return model


@contextlib.contextmanager
def _per_layer_counts(config) -> Iterator[None]:
    """
    For a checkpoint with per-layer expert counts (``num_experts_per_layer``,
    a non-uniform budget), build each decoder layer with its own count;
    otherwise change nothing.

    :raises ValueError: for a family whose per-layer build is not known
    """
    text = text_config(config)
    if per_layer_counts(text) is None:
        yield
        return
    family = per_layer_family(text.model_type)
    if family is None:
        raise ValueError(
            f"this {text.model_type} checkpoint keeps a different number of "
            f"experts per layer ({PER_LAYER_KEY}), which ream_modifiers builds "
            f"only for {sorted(PER_LAYER_FAMILIES)}; compress with a uniform "
            "budget for this family"
        )
    with building_per_layer(family.transformers_layer, family.count_attr):
        yield


def _model_type(model_id) -> str | None:
    try:
        config_dict, _ = PretrainedConfig.get_config_dict(model_id)
    except OSError:
        return None
    return config_dict.get("model_type")


def _stored_count(model_id, model_type: str | None) -> int | None:
    """The routed expert count in a checkpoint's config.json (its text config's),
    which per-set converters need (ERNIE-4.5-VL); None where unknown."""
    spec = ARCHITECTURES.get(model_type or "")
    if spec is None or not spec.expert_sets:
        return None
    config_dict, _ = PretrainedConfig.get_config_dict(model_id)
    text, _ = text_config_entry(config_dict)
    count = text.get(spec.num_experts_key)
    return count if isinstance(count, int) else None


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
    native = LOADED_AS.get(config_dict.get("model_type"))
    if native is None:
        return None
    config_class = CONFIG_MAPPING[native]
    logger.info(
        f"{model_id}: model_type {config_dict['model_type']!r} is loaded with "
        f"{config_class.__name__}"
    )
    return config_class.from_pretrained(model_id)


def _linearized(model: PreTrainedModel) -> PreTrainedModel:
    if any(isinstance(m._parameters, OffloadCache) for m in model.modules()):
        _linearize_offloaded(model)
    else:
        linearize_moe(model)
    adapt_input_weighted_blocks(model)
    adapt_forward_module(model)
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
