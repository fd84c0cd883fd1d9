"""The checker: read the layout, apply every rule."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ream_modifiers.check.layout import find_blocks, read_shapes, split_expert_sets
from ream_modifiers.check.multimodal import check_multimodal
from ream_modifiers.check.quantization import check_quantization
from ream_modifiers.check.report import CheckReport
from ream_modifiers.check.structure import (
    ConfigKeys,
    check_complete,
    check_config_counts,
    check_fused,
    check_router,
    check_routing,
    check_shapes,
    check_uniform,
    check_widths,
)
from ream_modifiers.moe.architectures import (
    ARCHITECTURES,
    MoEArchSpec,
    detect_spec,
    text_config_entry,
)
from ream_modifiers.moe.per_layer import per_layer_counts

__all__ = ["check_checkpoint"]


def check_checkpoint(path: str | Path) -> CheckReport:
    """
    Check a saved MoE checkpoint against what vLLM requires, reading only
    ``config.json`` and the safetensors headers.

    :param path: the checkpoint directory
    :return: the report; ``report.ok`` is False when any rule is broken
    """
    directory = Path(path)
    report = CheckReport(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        report.add(
            "no-config",
            str(config_path),
            "config.json is missing",
            "save the model with save_pretrained",
        )
        return report
    config = json.loads(config_path.read_text())
    text, prefix = text_config_entry(config)
    # the wrapper's model_type for a vision-language model (its row is the text's)
    report.model_type = config.get("model_type") or text.get("model_type")
    spec = _spec(text, report)
    if spec is None:
        return report
    shapes = read_shapes(directory, report)
    check_multimodal(report, config, shapes, directory)
    blocks, fused = find_blocks(shapes, spec)
    blocks = split_expert_sets(blocks, spec)
    if fused:
        _report_fused(report, fused, spec)
    if not any(block.experts or block.fused for block in blocks.values()):
        if not fused:
            report.add(
                "no-experts",
                str(directory),
                f"no per-expert tensors <block>.{spec.experts_attr}.<i>.<proj>."
                f"<param> found for model_type {spec.model_type!r}",
                "check that this is the MoE checkpoint that was compressed",
            )
        return report
    report.experts_per_layer = {b.name: b.count for b in blocks.values()}
    check_uniform(report, blocks, text)
    check_shapes(report, blocks)
    check_widths(report, blocks, spec, text)
    for block in blocks.values():
        check_fused(report, block, spec)
        check_complete(report, block, spec)
        check_router(report, block, spec, text)
    counts = set(report.experts_per_layer.values())
    if len(counts) == 1 or per_layer_counts(text) is not None:
        # per-layer counts: the config's count is the largest layer's, and
        # every layer must still reach top_k
        config_keys = ConfigKeys(spec, text, prefix)
        check_config_counts(report, config_keys, max(counts))
        check_routing(report, config_keys, min(counts))
    check_quantization(report, config, blocks, shapes, spec)
    return report


def _report_fused(report: CheckReport, fused: list[str], spec: MoEArchSpec) -> None:
    """Fused expert tensors outside the family's on-disk layout."""
    if spec.fused_experts:
        expected = ", ".join(f"{spec.experts_attr}.{n}" for n in spec.fused_experts)
        layout = f"{spec.model_type} stores its experts fused only as {expected}"
    else:
        layout = (
            f"vLLM and compressed-tensors expect {spec.model_type}'s experts as "
            f"per-expert {spec.experts_attr}.{{i}}.<proj>.weight tensors"
        )
    report.add(
        "fused-experts",
        fused[0],
        f"{len(fused)} fused expert tensors (e.g. {fused[0]}); {layout}",
        "load the model with ream_modifiers.moe.load_moe_model (per-expert "
        "Linear modules) before compressing, and save it with save_pretrained "
        "(which writes the family's hub layout)",
    )


def _spec(text: dict[str, Any], report: CheckReport) -> MoEArchSpec | None:
    spec = ARCHITECTURES.get(text.get("model_type"))
    if spec is not None:
        return spec
    from transformers import PretrainedConfig

    try:
        return detect_spec(PretrainedConfig.from_dict(text))
    except ValueError as error:
        report.add(
            "not-moe",
            "config.json model_type",
            str(error),
            "check an MoE checkpoint, or add its family to the architecture table",
        )
        return None
