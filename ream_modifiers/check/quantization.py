"""
Rules on quantization: routers stay unquantized and ignored, and the
compressed-tensors ``quantization_config`` matches the stored tensors.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from loguru import logger

from ream_modifiers.check.layout import QUANT_PARAMS, MoEBlock
from ream_modifiers.check.report import CheckReport
from ream_modifiers.moe.architectures import MoEArchSpec

__all__ = ["check_quantization"]

_ROUTER_FIX = (
    "keep routers in full precision: compress again with the expert modifier's "
    "protect_routers: true (the default), or add {pattern!r} to the quantization "
    "modifier's ignore list"
)


def _match(name: str, target: str) -> bool:
    """compressed-tensors' name matching: ``re:`` prefix is a regex, else exact."""
    if target.startswith("re:"):
        return re.match(target.removeprefix("re:"), name) is not None
    return target == name


def _router_pattern(spec: MoEArchSpec, router: str) -> str:
    """The family's default ignore pattern that covers ``router``, else its name."""
    return next((p for p in spec.quantization_ignore if _match(router, p)), router)


def _is_name_target(target: str) -> bool:
    return target.startswith("re:") or "." in target


def _group_for(
    groups: dict[str, dict[str, Any]], module: str, linear: bool
) -> str | None:
    """The config group that quantizes ``module`` (an ``nn.Linear`` if linear)."""
    for name, group in groups.items():
        targets = group.get("targets") or []
        if any(_match(module, t) for t in targets if _is_name_target(t)):
            return name
    if linear:
        for name, group in groups.items():
            if "Linear" in (group.get("targets") or []):
                return name
    return None


def _required_params(group: dict[str, Any], fmt: str | None) -> tuple[str, ...]:
    """Tensors a module quantized by ``group`` stores, per compressed-tensors."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme

    try:
        scheme = QuantizationScheme.model_validate(group)
        compressor = BaseCompressor.get_value_from_registry(fmt or "dense")
        return tuple(compressor.compression_param_names(scheme))
    except (KeyError, ValueError, NotImplementedError) as error:
        logger.debug(f"no parameter list for format {fmt!r}: {error}")
        return ("weight_scale",)


@dataclass
class _QuantConfig:
    """The compressed-tensors ``quantization_config`` of a checkpoint."""

    groups: dict[str, dict[str, Any]]
    ignore: list[str]
    format: str | None

    def ignored(self, module: str) -> bool:
        return any(_match(module, target) for target in self.ignore)

    def group_format(self, name: str) -> str | None:
        return self.groups[name].get("format") or self.format

    def group_for(self, module: str) -> str | None:
        return _group_for(self.groups, module, linear=True)


def check_quantization(
    report: CheckReport,
    config: dict[str, Any],
    blocks: dict[str, MoEBlock],
    shapes: dict[str, tuple[int, ...]],
    spec: MoEArchSpec,
) -> None:
    modules: dict[str, set[str]] = defaultdict(set)
    for name in shapes:
        module, _, param = name.rpartition(".")
        modules[module].add(param)
    quantized = sorted(m for m, params in modules.items() if params & QUANT_PARAMS)
    qconfig = config.get("quantization_config")
    if not qconfig:
        if quantized:
            report.add(
                "quantization-config-missing",
                quantized[0],
                f"{len(quantized)} modules store quantized tensors (e.g. "
                f"{quantized[0]}: {sorted(modules[quantized[0]])}) but config.json "
                "has no quantization_config, so they cannot be dequantized",
                "save with llm-compressor (oneshot output_dir or "
                "model.save_pretrained after oneshot), which writes the "
                "compressed-tensors quantization_config",
            )
        return
    if qconfig.get("quant_method") != "compressed-tensors":
        logger.info(f"quant_method {qconfig.get('quant_method')!r}: not checked")
        return
    quant = _QuantConfig(
        qconfig.get("config_groups") or {},
        qconfig.get("ignore") or [],
        qconfig.get("format"),
    )
    report.quantization_format = quant.format
    for block in blocks.values():
        _check_router(report, quant, block, modules, spec)
    for module in quantized:
        _check_quantized_module(report, quant, module, modules[module])
    for block in blocks.values():
        _check_experts_quantized(report, quant, block, spec)


def _check_router(
    report: CheckReport,
    quant: _QuantConfig,
    block: MoEBlock,
    modules: dict[str, set[str]],
    spec: MoEArchSpec,
) -> None:
    """Routers and shared-expert gates: never quantized, routers always ignored."""
    if not block.router:
        return
    any_param = next(iter(block.router.values()))
    router = any_param.disk[: any_param.disk.rindex(".")]
    pattern = _router_pattern(spec, router)
    for module in [router] + ([block.gate_module] if block.gate_module else []):
        packed = sorted(modules[module] & QUANT_PARAMS)
        if packed:
            report.add(
                "quantized-router",
                f"{module}.{packed[0]}",
                f"router {module} is stored quantized ({', '.join(packed)}); "
                "quantized routers pick the wrong experts or load as zeros",
                _ROUTER_FIX.format(pattern=pattern),
            )
    if not quant.ignored(router) and quant.group_for(router):
        loaders = (
            "compressed-tensors (transformers) and vLLM create"
            if spec.router_quantizable_in_vllm
            else "compressed-tensors (transformers' loader) creates"
        )
        report.add(
            "router-not-ignored",
            router,
            f"router is not covered by quantization_config.ignore: {loaders} "
            "a quantized layer for it (it is a Linear) that needs quantized "
            "tensors",
            f"add {router!r} (or {pattern!r}) to quantization_config.ignore and "
            "keep the router unquantized",
        )


def _check_quantized_module(
    report: CheckReport, quant: _QuantConfig, module: str, params: set[str]
) -> None:
    """A quantized module carries its format's tensors and is not ignored."""
    if quant.ignored(module):
        report.add(
            "ignored-but-quantized",
            module,
            f"listed in quantization_config.ignore but stores "
            f"{sorted(params & QUANT_PARAMS)}; vLLM loads it as unquantized",
            "remove it from ignore, or store it unquantized (plain weight)",
        )
        return
    group = quant.group_for(module)
    if group is None:
        return
    required = _required_params(quant.groups[group], quant.group_format(group))
    missing = [p for p in required if p not in params]
    if missing:
        report.add(
            "incomplete-quantized-tensors",
            module,
            f"quantized as {quant.group_format(group)} by config_groups.{group} but "
            f"lacks {missing} (has {sorted(params)})",
            "save again from the quantized model; the quantization_config must "
            "describe the tensors actually stored",
        )


def _check_experts_quantized(
    report: CheckReport, quant: _QuantConfig, block: MoEBlock, spec: MoEArchSpec
) -> None:
    """Experts the config says are quantized must be stored quantized."""
    if block.fused:
        # compressed-tensors names (and vLLM matches) experts per expert
        module = f"{block.name}.{spec.experts_attr}.0.{spec.hub_projections[0]}"
        group = None if quant.ignored(module) else quant.group_for(module)
        if group is not None:
            report.add(
                "unquantized-experts",
                block.name,
                f"fused expert tensors ({', '.join(sorted(block.fused))}) are "
                f"stored unquantized, but config_groups.{group} "
                f"({quant.group_format(group)}) targets the experts; vLLM would "
                "look for per-expert quantized tensors",
                "quantize the experts (they are saved per expert then) or "
                "list them in quantization_config.ignore",
            )
        return
    plain = []
    for projections in block.experts.values():
        for params in projections.values():
            tensor = next(iter(params.values()))
            module = tensor.disk[: tensor.disk.rindex(".")]
            if params.keys() & QUANT_PARAMS or quant.ignored(module):
                continue
            group = quant.group_for(module)
            if group is not None:
                plain.append((module, group))
    if plain:
        module, group = plain[0]
        report.add(
            "unquantized-experts",
            block.name,
            f"{len(plain)} expert projections (e.g. {module}) are targeted by "
            f"config_groups.{group} ({quant.group_format(group)}) but stored "
            "unquantized; vLLM would look for quantized tensors",
            "quantize every expert (moe_calibrate_all_experts=True) or list the "
            "unquantized ones in quantization_config.ignore",
        )
