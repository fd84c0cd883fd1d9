"""
Rules on the MoE structure: uniform, complete expert sets of one shape, routers
sized to match, config counts, group divisibility and reachable top-k.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

from ream_modifiers.check.layout import QUANT_PARAMS, MoEBlock, StoredTensor
from ream_modifiers.check.report import CheckReport
from ream_modifiers.moe.architectures import MoEArchSpec

__all__ = [
    "check_complete",
    "check_config_counts",
    "check_router",
    "check_routing",
    "check_shapes",
    "check_uniform",
]


def check_uniform(report: CheckReport, blocks: dict[str, MoEBlock]) -> None:
    counts = report.experts_per_layer
    if len(set(counts.values())) == 1:
        return
    listed = ", ".join(f"{name}: {n}" for name, n in counts.items())
    report.add(
        "non-uniform-experts",
        next(iter(blocks.values())).name.rsplit(".", 2)[0],
        f"MoE layers store different expert counts ({listed}); vLLM builds every "
        "MoE layer with the one count in config.json and cannot load this",
        "compress with a uniform budget (num_experts or sparsity; MoEITS without "
        "allow_nonuniform) so every layer keeps the same number of experts",
    )


def check_shapes(report: CheckReport, blocks: dict[str, MoEBlock]) -> None:
    """vLLM stacks every layer's experts into one tensor: one shape per tensor."""
    tensors: dict[tuple[str, str], list[StoredTensor]] = defaultdict(list)
    for block in blocks.values():
        for projections in block.experts.values():
            for proj, params in projections.items():
                for param, tensor in params.items():
                    tensors[proj, param].append(tensor)
    for (proj, param), found in tensors.items():
        common = Counter(t.shape for t in found).most_common(1)[0][0]
        odd = [t for t in found if t.shape != common]
        if not odd:
            continue
        report.add(
            "expert-shape",
            odd[0].disk,
            f"{len(odd)} {proj}.{param} tensor(s) differ from the common shape "
            f"{list(common)} (this one is {list(odd[0].shape)}); vLLM stacks all "
            "experts into one tensor per layer, sized from config.json",
            "merge or recombine experts back to the original width "
            "(moe_intermediate_size) before saving",
        )


def check_complete(report: CheckReport, block: MoEBlock, spec: MoEArchSpec) -> None:
    """Experts 0..N-1 of a layer each hold the same set of tensors."""
    wanted: dict[tuple[str, str], str] = {}  # (proj, param) -> stored name pattern
    for index, projections in block.experts.items():
        for proj, params in projections.items():
            for param, tensor in params.items():
                marker = f".{spec.experts_attr}.{index}."
                wanted.setdefault(
                    (proj, param),
                    tensor.disk.replace(marker, f".{spec.experts_attr}.{{i}}.", 1),
                )
    for index in range(block.count):
        have = block.experts.get(index, {})
        missing = [
            pattern.format(i=index)
            for (proj, param), pattern in sorted(wanted.items())
            if param not in have.get(proj, {})
        ]
        if not missing:
            continue
        what = "has no tensors" if not have else "lacks tensors"
        report.add(
            "missing-expert-tensors",
            f"{block.name}.{spec.experts_attr}.{index}",
            f"expert {index} of {block.count} {what}: {', '.join(missing)}; every "
            f"expert 0..{block.count - 1} needs the same tensors",
            "save the checkpoint again from the compressed model (a shard was "
            "lost or an expert was dropped without renumbering the others)",
        )


def check_router(
    report: CheckReport, block: MoEBlock, spec: MoEArchSpec, text: dict[str, Any]
) -> None:
    n = block.count
    router = f"{block.name}.{spec.router_attr}"
    fix = (
        "slice router rows and biases together with the experts "
        "(ream_modifiers.moe.keep_experts does both)"
    )
    weight = block.router.get("weight")
    if weight is None and not QUANT_PARAMS & block.router.keys():
        report.add(
            "missing-router",
            f"{router}.weight",
            f"no router weight for {block.name}",
            "save the checkpoint again; the router must be stored",
        )
    if weight is not None and weight.shape[0] != n:
        report.add(
            "router-shape",
            weight.disk,
            f"router has {weight.shape[0]} rows but the layer stores {n} experts",
            fix,
        )
    biases = [block.router.get("bias")]
    if spec.bias_attr:
        owner = block.router if spec.bias_location == "router" else block.block_params
        correction = owner.get(spec.bias_attr)
        biases.append(correction)
        if correction is None and text.get("topk_method") == "noaux_tc":
            report.add(
                "missing-correction-bias",
                f"{router}.{spec.bias_attr}",
                "config.json has topk_method='noaux_tc', for which vLLM creates "
                f"and loads {spec.bias_attr}, but the checkpoint has none",
                "save the checkpoint again from a model that has the bias",
            )
    for bias in biases:
        if bias is not None and bias.shape[-1] != n:
            report.add(
                "router-shape",
                bias.disk,
                f"has {bias.shape[-1]} entries but the layer stores {n} experts",
                fix,
            )


def check_config_counts(
    report: CheckReport,
    spec: MoEArchSpec,
    text: dict[str, Any],
    prefix: str,
    count: int,
) -> None:
    keys = spec.num_experts_keys
    present = {key: text[key] for key in keys if key in text}
    if not present:
        report.add(
            "config-count",
            f"config.json {prefix}{keys[0]}",
            f"no expert count key ({', '.join(keys)}) for model_type "
            f"{spec.model_type!r}",
            f"set {prefix}{keys[0]} to {count}",
        )
    for key, value in present.items():
        if value != count:
            report.add(
                "config-count",
                f"config.json {prefix}{key}",
                f"{key}={value}, but every MoE layer stores {count} experts; vLLM "
                f"would build {value}-expert layers and fail to load the weights",
                f"set {', '.join(prefix + k for k in keys)} to {count}",
            )


def check_routing(
    report: CheckReport,
    spec: MoEArchSpec,
    text: dict[str, Any],
    prefix: str,
    count: int,
) -> None:
    top_k = text.get(spec.top_k_key)
    n_group = text.get(spec.n_group_key) if spec.n_group_key else None
    topk_group = text.get(spec.topk_group_key) if spec.topk_group_key else None
    budget_fix = (
        "compress to an expert count that divides evenly into the router groups "
        "and keeps top-k reachable (the modifiers plan such budgets)"
    )
    if isinstance(top_k, int) and top_k > count:
        report.add(
            "top-k",
            f"config.json {prefix}{spec.top_k_key}",
            f"{spec.top_k_key}={top_k} exceeds the {count} experts per layer",
            budget_fix,
        )
    if not isinstance(n_group, int) or n_group <= 1:
        return
    if count % n_group:
        report.add(
            "n-group",
            f"config.json {prefix}{spec.n_group_key}",
            f"{spec.n_group_key}={n_group} does not divide the {count} experts per "
            "layer; grouped top-k reshapes the scores to [tokens, n_group, -1]",
            budget_fix,
        )
        return
    per_group = count // n_group
    if spec.group_score == "top2_sum" and per_group < 2:
        report.add(
            "n-group",
            f"config.json {prefix}{spec.n_group_key}",
            f"{per_group} expert per group; the group score sums each group's "
            "top-2 experts",
            budget_fix,
        )
    if isinstance(topk_group, int) and isinstance(top_k, int):
        reachable = min(topk_group, n_group) * per_group
        if top_k > reachable:
            report.add(
                "top-k",
                f"config.json {prefix}{spec.top_k_key}",
                f"{spec.top_k_key}={top_k}, but with {spec.n_group_key}={n_group} "
                f"and {spec.topk_group_key}={topk_group} a token reaches only "
                f"{reachable} of the {count} experts",
                budget_fix,
            )
