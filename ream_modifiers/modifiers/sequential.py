"""
Subgraph granularity (llm-compressor's ``sequential_targets``) and expert
reduction.

Expert reduction needs every MoE block whole inside one subgraph: its statistics
come from hooks on the experts block (hidden states and routing), and the block is
edited at the end of the subgraph that ran it. Targets inside a block (per-expert
subgraphs, ``sequential_targets=[<attention class>, "ExpertMLP"]``) suit GPTQ on
memory-heavy layers, so a run that wants them calibrates in two passes: the expert
reduction with decoder-layer subgraphs, then the following modifiers with the
finer targets (:func:`split_at_expert_reduction`).
"""

from __future__ import annotations

from collections.abc import Sequence

from compressed_tensors.utils import match_named_modules
from llmcompressor.modifiers import Modifier
from llmcompressor.modifiers.quantization.quantization.mixin import QuantizationMixin
from loguru import logger
from torch import nn

from ream_modifiers.moe.architectures import get_arch_spec
from ream_modifiers.moe.layer import MoELayer

__all__ = [
    "check_sequential_targets",
    "split_at_expert_reduction",
    "protect_routers",
]


def check_sequential_targets(
    model: nn.Module, layers: Sequence[MoELayer], targets: str | Sequence[str] | None
) -> None:
    """
    Refuse ``sequential_targets`` that match modules inside an MoE block.

    :raises ValueError: naming the first such module and the two-pass fix
    """
    if not targets:
        return
    targets = [targets] if isinstance(targets, str) else list(targets)
    matched = {id(module): name for name, module in match_named_modules(model, targets)}
    for layer in layers:
        for module in layer.block.modules():
            if module is not layer.block and id(module) in matched:
                raise ValueError(
                    f"sequential_targets {targets} match {matched[id(module)]}, inside "
                    f"the MoE block {layer.name}: expert reduction needs each MoE "
                    "block whole in one subgraph (the default decoder-layer targets "
                    "do that). Run the expert reduction in its own oneshot without "
                    "sequential_targets, then quantize in a second oneshot with them "
                    "(the CLI's --sequential-targets does this)."
                )


def split_at_expert_reduction(
    modifiers: Sequence[Modifier],
) -> tuple[list[Modifier], list[Modifier]]:
    """
    ``(through the last expert-reduction modifier, the rest)`` of a recipe's
    modifiers, in order; the first part is empty when the recipe reduces no
    experts.
    """
    from ream_modifiers.modifiers.base import ExpertReductionModifier

    last = max(
        (i for i, m in enumerate(modifiers) if isinstance(m, ExpertReductionModifier)),
        default=-1,
    )
    return list(modifiers[: last + 1]), list(modifiers[last + 1 :])


def protect_routers(
    model: nn.Module, reducers: Sequence[Modifier], followers: Sequence[Modifier]
) -> None:
    """
    Add the family's router and shared-expert-gate patterns to the ``ignore`` of
    every quantization modifier in ``followers``, as an expert-reduction modifier
    does for quantization modifiers in its own recipe, when they run in a separate
    oneshot. Skipped when every reducer has ``protect_routers: false``.
    """
    if not any(getattr(m, "protect_routers", False) for m in reducers):
        return
    patterns = list(get_arch_spec(model.config).quantization_ignore)
    for modifier in followers:
        if not isinstance(modifier, QuantizationMixin):
            continue
        added = [p for p in patterns if p not in modifier.ignore]
        if added:
            modifier.ignore = [*modifier.ignore, *added]
            modifier._resolved_config = None  # resolve again with the ignores
            logger.info(f"{type(modifier).__name__}: not quantizing {added}")
