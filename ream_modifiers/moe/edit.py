"""
In-place structural edits of MoE layers.

Every edit keeps the surviving module objects: quantization modifiers such as
GPTQ attach their schemes and bookkeeping to those objects at initialization, so
new modules would be silently skipped or crash the later save.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import replace

import torch
from compressed_tensors import align_module_device
from compressed_tensors.offload import disable_onloading
from llmcompressor.modeling.moe.linear_experts import ExpertMLP
from loguru import logger
from torch import nn
from transformers import PreTrainedModel

from ream_modifiers.moe.architectures import MoEArchSpec, text_config
from ream_modifiers.moe.layer import MoELayer
from ream_modifiers.moe.offload import write_parameter

__all__ = [
    "keep_experts",
    "write_expert",
    "set_router_rows",
    "sync_config",
    "expert_count_values",
]

# Attributes in which modules cache the expert count they were built with: the
# generic names, and the family's own config keys (modules copy them)
_GENERIC_COUNT_ATTRS = ("num_experts", "n_experts")


@torch.no_grad()
def keep_experts(layer: MoELayer, keep: Sequence[int]) -> None:
    """
    Keep only the experts ``keep``, in that order, with their router rows and
    biases. The kept ``ExpertMLP`` objects are reused, so quantization state
    attached to them survives.

    :param layer: the MoE layer to edit
    :param keep: indices into the current experts; order defines the new order
    """
    keep = [int(i) for i in keep]
    n = layer.num_experts
    if not keep or len(set(keep)) != len(keep) or not all(0 <= i < n for i in keep):
        raise ValueError(
            f"{layer.name}: keep must list distinct expert indices in [0, {n}), "
            f"got {keep}"
        )
    experts = layer.experts
    others = [
        (k, m) for k, m in experts._modules.items() if not isinstance(m, ExpertMLP)
    ]
    modules = OrderedDict((str(new), experts[old]) for new, old in enumerate(keep))
    modules.update(others)  # the shared act_fn entry stays last
    experts._modules = modules

    index = torch.tensor(keep, dtype=torch.long)
    router = layer.router
    with align_module_device(router):
        rows = router.weight.detach()[index.to(router.weight.device)]
        bias = layer.router_bias
        bias = None if bias is None else bias.detach()[index.to(bias.device)]
    correction = layer.correction_bias
    if correction is not None:
        with align_module_device(layer.bias_owner):
            correction = layer.correction_bias.detach()
            correction = correction[..., index.to(correction.device)]
    set_router_rows(layer, rows, bias=bias, correction_bias=correction)
    _set_cached_counts(layer, len(keep))


@torch.no_grad()
def write_expert(
    layer: MoELayer,
    index: int,
    *,
    gate: torch.Tensor | None = None,
    up: torch.Tensor | None = None,
    down: torch.Tensor | None = None,
    gate_bias: torch.Tensor | None = None,
    up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
) -> None:
    """
    Overwrite expert ``index``'s weights in place (same shapes, same parameter
    objects, cast to the parameter dtype). Projections left as None are unchanged.
    An offloaded expert's weights are written to its offload storage (CPU copy or
    disk file) and to any onloaded copy, so later reads see the new values.
    """
    expert = layer.expert(index)
    updates = {
        ("gate_proj", "weight"): gate,
        ("up_proj", "weight"): up,
        ("down_proj", "weight"): down,
        ("gate_proj", "bias"): gate_bias,
        ("up_proj", "bias"): up_bias,
        ("down_proj", "bias"): down_bias,
    }
    for (proj, attr), value in updates.items():
        if value is None:
            continue
        linear = getattr(expert, proj, None)
        with disable_onloading():  # shape check without reading an offloaded tensor
            target = None if linear is None else getattr(linear, attr, None)
        if target is None:
            raise ValueError(f"{layer.name}.experts.{index} has no {proj}.{attr}")
        if tuple(target.shape) != tuple(value.shape):
            raise ValueError(
                f"{layer.name}.experts.{index}.{proj}.{attr} has shape "
                f"{tuple(target.shape)}, cannot write {tuple(value.shape)}"
            )
        # not getattr(...).copy_(): for an offloaded module that would only change
        # a temporary onloaded copy
        write_parameter(linear, attr, value)


@torch.no_grad()
def set_router_rows(
    layer: MoELayer,
    rows: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    correction_bias: torch.Tensor | None = None,
) -> None:
    """
    Replace the router weight by ``rows`` (``[E', H]``), and the router's logit bias
    and score-correction bias when given. The router module object is kept.
    """
    router = layer.router
    _store(router, "weight", rows)
    if bias is not None:
        _store(router, "bias", bias)
    if correction_bias is not None:
        _store(layer.bias_owner, layer.bias_name, correction_bias)
    if isinstance(getattr(router, "out_features", None), int):
        router.out_features = rows.shape[0]


def _store(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """
    Set ``module.<name>`` to ``value``: written in place when the shape is
    unchanged (through the offload storage, source rank only where the ranks
    share it), else assigned anew (a parameter stays a parameter), which an
    offloaded module's cache stores on every rank.
    """
    old = getattr(module, name)
    if tuple(old.shape) == tuple(value.shape):
        write_parameter(module, name, value)
        return
    new = value.to(old.dtype).contiguous()
    if isinstance(old, nn.Parameter):  # buffers (most correction biases) stay buffers
        new = nn.Parameter(new, requires_grad=old.requires_grad)
    setattr(module, name, new)


def _set_cached_counts(layer: MoELayer, count: int) -> None:
    attrs = dict.fromkeys((*_GENERIC_COUNT_ATTRS, *layer.spec.num_experts_keys))
    for holder in layer.count_holders():
        for attr in attrs:
            if isinstance(getattr(holder, attr, None), int):
                setattr(holder, attr, count)
    layer.routing = replace(layer.routing, num_experts=count)


def expert_count_values(spec: MoEArchSpec, num_experts: int) -> dict[str, int]:
    """Every config key of ``spec`` that stores the expert count, set to the count."""
    return {key: num_experts for key in spec.num_experts_keys}


def sync_config(model: PreTrainedModel, spec: MoEArchSpec, num_experts: int) -> None:
    """Write the new expert count into every config key the family uses."""
    config = text_config(model.config)
    for key, value in expert_count_values(spec, num_experts).items():
        old = getattr(config, key, None)
        setattr(config, key, value)
        if old != value:
            logger.info(f"config.{key}: {old} -> {value}")
