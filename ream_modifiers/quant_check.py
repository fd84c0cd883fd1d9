"""
Quantization settings checked against the loaded model before calibration.

GPTQ and the quantization modifiers split each targeted ``Linear``'s input
dimension into groups of ``group_size``; a width that the group size does not
divide fails inside GPTQ, after the expert reduction has already calibrated
(DeepSeek's ``kv_b_proj`` takes the ``kv_lora_rank``-wide latent).
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from ream_modifiers.errors import InputError
from ream_modifiers.moe.architectures import get_arch_spec

__all__ = ["check_group_sizes"]


def check_group_sizes(model: nn.Module, modifiers: Iterable[object]) -> None:
    """
    :raises InputError: naming every targeted ``Linear`` whose input width the
        weight group size does not divide, and the ways out
    """
    from compressed_tensors.utils import match_named_modules

    spec_ignore = list(get_arch_spec(model.config).quantization_ignore)
    problems: list[tuple[str, int, int, str]] = []
    for modifier in modifiers:
        resolve = getattr(modifier, "resolve_quantization_config", None)
        if resolve is None:
            continue
        ignore = [*(getattr(modifier, "ignore", None) or []), *spec_ignore]
        for scheme in resolve().config_groups.values():
            group = getattr(scheme.weights, "group_size", None)
            if not isinstance(group, int) or group <= 0:
                continue
            for name, module in match_named_modules(model, scheme.targets, ignore):
                width = getattr(module, "in_features", None)
                if isinstance(width, int) and width % group:
                    problems.append((name, width, group, type(modifier).__name__))
    if not problems:
        return
    name, width, group, modifier = problems[0]
    layers = sorted({_pattern(p[0]) for p in problems})
    raise InputError(
        f"{modifier}: group_size {group} does not divide the input width of "
        f"{len(problems)} targeted Linear layer(s), e.g. {name} ({width} wide)",
        f"add {', '.join(repr(f're:{p}') for p in layers)} to the modifier's "
        "ignore list, or use a scheme whose group size divides "
        f"{width} (e.g. a channel-wise one such as W8A16)",
    )


def _pattern(name: str) -> str:
    """``model.layers.3.self_attn.kv_b_proj`` -> ``.*self_attn.kv_b_proj$``."""
    return ".*" + ".".join(name.split(".")[-2:]) + "$"
