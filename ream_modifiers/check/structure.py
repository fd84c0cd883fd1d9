"""
Rules on the MoE structure: uniform, complete expert sets of one shape in the
family's on-disk layout, routers and biases sized to match, config counts, group
divisibility and reachable top-k.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

from ream_modifiers.check.layout import QUANT_PARAMS, MoEBlock, StoredTensor
from ream_modifiers.check.report import CheckReport
from ream_modifiers.moe.architectures import PACKED_PARAMS, MoEArchSpec
from ream_modifiers.moe.per_layer import (
    PER_LAYER_FAMILIES,
    PER_LAYER_KEY,
    mismatched_counts,
    per_layer_counts,
    per_layer_family,
)

__all__ = [
    "ConfigKeys",
    "check_complete",
    "check_config_counts",
    "check_fused",
    "check_packed_names",
    "check_router",
    "check_routing",
    "check_shapes",
    "check_uniform",
    "check_widths",
]


def check_uniform(
    report: CheckReport, blocks: dict[str, MoEBlock], text: dict[str, Any]
) -> None:
    """
    One expert count in every MoE layer, or per-layer counts that config.json
    lists (:data:`~ream_modifiers.moe.per_layer.PER_LAYER_KEY`) for a family
    whose per-layer build ream_modifiers knows.
    """
    counts = report.experts_per_layer
    if len(set(counts.values())) == 1:
        return
    listed = ", ".join(f"{name}: {n}" for name, n in counts.items())
    declared = per_layer_counts(text)
    if declared is not None:
        _check_declared_counts(report, counts, declared)
        return
    report.add(
        "non-uniform-experts",
        next(iter(blocks.values())).name.rsplit(".", 2)[0],
        f"MoE layers store different expert counts ({listed}); vLLM builds every "
        "MoE layer with the one count in config.json and cannot load this",
        "compress with a uniform budget (num_experts or sparsity; MoEITS without "
        "allow_nonuniform) so every layer keeps the same number of experts",
    )


def _check_declared_counts(
    report: CheckReport, counts: dict[str, int], declared: list
) -> None:
    where = f"config.json {PER_LAYER_KEY}"
    if per_layer_family(report.model_type) is None:
        report.add(
            "per-layer-experts-unsupported",
            where,
            f"{report.model_type} layers store different expert counts, and "
            f"neither transformers, vLLM nor ream_modifiers' builders can load "
            f"them for this family (per-layer builds: {sorted(PER_LAYER_FAMILIES)})",
            "compress with a uniform budget (num_experts or sparsity)",
        )
        return
    wrong = mismatched_counts(list(counts.items()), declared)
    if wrong:
        listed = ", ".join(f"{n}: stores {c}, lists {d}" for n, (c, d) in wrong.items())
        report.add(
            "per-layer-experts-mismatch",
            where,
            f"the per-layer expert counts do not match the stored experts ({listed})",
            "save again from the compressed model (its config lists the counts)",
        )
        return
    report.notes.append(
        f"per-layer expert counts {declared}: loads with "
        "ream_modifiers.load_moe_model, and in vLLM with ream-modifiers installed "
        "in its environment (plugin)"
    )


def check_shapes(report: CheckReport, blocks: dict[str, MoEBlock]) -> None:
    """
    vLLM stacks every layer's experts into one tensor: one shape per expert
    tensor (fused tensors: past the expert dim, which check_uniform covers).
    """
    tensors: dict[str, list[tuple[StoredTensor, tuple[int, ...]]]] = defaultdict(list)
    for block in blocks.values():
        # expert sets (ERNIE-4.5-VL's text and vision) have widths of their own
        kind = f"{block.expert_set}: " if block.expert_set else ""
        for projections in block.experts.values():
            for proj, params in projections.items():
                for param, tensor in params.items():
                    tensors[f"{kind}{proj}.{param}"].append((tensor, tensor.shape))
        for name, tensor in block.fused.items():
            tensors[name].append((tensor, tensor.shape[1:]))
    for label, found in tensors.items():
        common = Counter(shape for _, shape in found).most_common(1)[0][0]
        odd = [(t, shape) for t, shape in found if shape != common]
        if not odd:
            continue
        report.add(
            "expert-shape",
            odd[0][0].disk,
            f"{len(odd)} {label} tensor(s) differ from the common shape "
            f"{list(common)} (this one is {list(odd[0][1])}); vLLM stacks all "
            "experts into one tensor per layer, sized from config.json",
            "merge or recombine experts back to the original width "
            "(moe_intermediate_size) before saving",
        )


def _expected_rows(proj: str, width: int, hidden: int, spec: MoEArchSpec):
    """Output rows of one expert projection, by its role; None if unknown."""
    gate_up, down = spec.packed_expert_names or ("", "")
    if proj == gate_up:
        return 2 * width
    if proj == down or "down" in proj:
        return hidden
    if "gate" in proj or "up" in proj:
        return width
    return None


def check_widths(
    report: CheckReport,
    blocks: dict[str, MoEBlock],
    spec: MoEArchSpec,
    text: dict[str, Any],
) -> None:
    """
    vLLM sizes every expert tensor from config.json (``hidden_size`` and the
    family's :attr:`MoEArchSpec.intermediate_size_key`): a narrower expert
    would be copied into the front of an uninitialised parameter, a wider one
    fails to load.
    """
    width, hidden = text.get(spec.intermediate_size_key), text.get("hidden_size")
    if not isinstance(width, int) or not isinstance(hidden, int):
        return  # e.g. a per-layer list of widths
    fused = {"gate_up_proj": (hidden, 2 * width), "down_proj": (width, hidden)}
    for block in blocks.values():
        found: list[tuple[StoredTensor, str]] = []
        for projections in block.experts.values():
            for proj, params in projections.items():
                rows = _expected_rows(proj, width, hidden, spec)
                tensor = params.get("weight") or params.get("weight_packed")
                if rows is None or tensor is None or not tensor.shape:
                    continue
                if tensor.shape[0] != rows:
                    found.append((tensor, f"{rows} rows"))
                elif "weight" in params and len(tensor.shape) == 2:
                    columns = width if "down" in proj else hidden
                    if tensor.shape[1] != columns:
                        found.append((tensor, f"{columns} columns"))
        for name, dims in fused.items():
            tensor = block.fused.get(name)
            if tensor is not None and tuple(tensor.shape[1:]) != dims:
                found.append((tensor, f"shape [E, {dims[0]}, {dims[1]}]"))
        if found:
            tensor, want = found[0]
            report.add(
                "expert-width",
                tensor.disk,
                f"has shape {list(tensor.shape)}, but config.json "
                f"({spec.intermediate_size_key}={width}, hidden_size={hidden}) "
                f"makes vLLM allocate {want} ({len(found)} tensor(s) in this layer); "
                "a narrower expert loads into the front of uninitialised memory",
                f"keep every expert at {spec.intermediate_size_key}={width} (merge "
                "and recombine at the original width), or fix config.json",
            )


def check_complete(report: CheckReport, block: MoEBlock, spec: MoEArchSpec) -> None:
    """Experts 0..N-1 of a layer each hold the same set of tensors."""
    if not block.experts:
        return  # fused layout: check_fused
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


def check_fused(report: CheckReport, block: MoEBlock, spec: MoEArchSpec) -> None:
    """
    A family whose hub layout is fused (:attr:`MoEArchSpec.fused_experts`, or
    :attr:`MoEArchSpec.hub_fused_experts` for a hub checkpoint of a family
    saved per expert here) stores unquantized experts in exactly those tensors,
    each with the same expert count first; compressed-tensors keeps quantized
    experts per expert.
    """
    experts = f"{block.name}.{spec.experts_attr}"
    if block.fused and block.experts:
        report.add(
            "mixed-expert-layout",
            experts,
            f"stores both fused ({', '.join(sorted(block.fused))}) and per-expert "
            "tensors; vLLM loads one layout per layer",
            "save the checkpoint again from the compressed model",
        )
        return
    if block.fused:
        layout = spec.fused_experts or spec.hub_fused_experts
        missing = [name for name in layout if name not in block.fused]
        if missing:
            report.add(
                "missing-expert-tensors",
                f"{experts}.{missing[0]}",
                f"the fused {spec.model_type} layout also needs "
                f"{', '.join(f'{experts}.{name}' for name in missing)}",
                "save the checkpoint again from the compressed model",
            )
        odd = [t for t in block.fused.values() if t.shape[:1] != (block.count,)]
        for tensor in odd:
            report.add(
                "expert-shape",
                tensor.disk,
                f"stores {tensor.shape[0] if tensor.shape else 0} experts along "
                f"dim 0, the layer's other fused tensors {block.count}",
                "slice every fused expert tensor with the same kept experts "
                "(ream_modifiers.moe.keep_experts does)",
            )
        return
    quantized = any(
        params.keys() & QUANT_PARAMS
        for projections in block.experts.values()
        for params in projections.values()
    )
    if quantized and spec.packed_expert_names:
        check_packed_names(report, block, spec)
    if spec.fused_experts and not quantized:
        report.add(
            "unfused-experts",
            experts,
            f"unquantized experts stored per expert, but {spec.model_type} "
            f"checkpoints store them fused ({', '.join(spec.fused_experts)}), "
            "which is the layout vLLM loads",
            "save with ream_modifiers (ensure_hub_save_names writes the hub's "
            "fused layout for unquantized experts)",
        )


def check_packed_names(report: CheckReport, block: MoEBlock, spec: MoEArchSpec) -> None:
    """
    Quantized experts of a family whose vLLM loader reads them under fused
    per-expert names (:attr:`MoEArchSpec.packed_expert_names`) are stored under
    exactly those names and parameters.
    """
    packed = spec.packed_expert_names or ()
    gate_up, down = packed
    names = ", ".join(f"{p}_{{{','.join(PACKED_PARAMS)}}}" for p in packed)
    fix = (
        "save with ream_modifiers, which writes these names, or convert the saved "
        "checkpoint in place with ream_modifiers.moe.packed_names."
        "write_packed_names(DIR, spec)"
    )
    index, projections = next(iter(sorted(block.experts.items())))
    other = sorted(projections.keys() - set(packed))
    if other:
        first = next(iter(projections[other[0]].values()))
        report.add(
            "unread-expert-names",
            first.disk,
            f"quantized experts stored per projection ({', '.join(other)}); vLLM's "
            f"{spec.model_type} loader reads quantized experts only as "
            f"{spec.experts_attr}.{{i}}.{names} ({gate_up}: gate and up rows "
            "interleaved) and skips these names without an error, so the "
            "experts would be served uninitialised",
            fix,
        )
        return
    for proj in packed:
        params = projections.get(proj, {})
        where = f"{block.name}.{spec.experts_attr}.{index}.{proj}"
        missing = [p for p in PACKED_PARAMS if p not in params]
        extra = sorted(params.keys() - set(PACKED_PARAMS))
        if missing:
            report.add(
                "missing-expert-tensors",
                f"{where}_{missing[0]}",
                f"vLLM's {spec.model_type} loader needs "
                f"{', '.join(f'{proj}_{p}' for p in missing)} for every expert",
                fix,
            )
        if extra:
            report.add(
                "unloadable-expert-tensor",
                f"{where}_{extra[0]}",
                f"vLLM's {spec.model_type} loader cannot load "
                f"{', '.join(f'{proj}_{p}' for p in extra)}: a name with "
                f".{proj}_weight that it does not stream goes to its fused-tensor "
                "branch, which fails on it",
                f"remove those tensors; {fix}",
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
    _check_correction_bias(report, block, spec, text)
    for bias in (block.router.get("bias"), block.bias):
        if bias is None:
            continue
        if not bias.shape or bias.shape[-1] != n:
            entries = bias.shape[-1] if bias.shape else 0
            report.add(
                "router-shape",
                bias.disk,
                f"has {entries} entries but the layer stores {n} experts",
                fix,
            )
        elif bias is block.bias and bias.shape[:-1] != spec.bias_leading_dims:
            expected = [*spec.bias_leading_dims, n]
            report.add(
                "router-shape",
                bias.disk,
                f"has shape {list(bias.shape)}; {spec.model_type} stores it as "
                f"{expected}",
                "save the checkpoint again with transformers' save_pretrained",
            )


def _check_correction_bias(
    report: CheckReport, block: MoEBlock, spec: MoEArchSpec, text: dict[str, Any]
) -> None:
    """The score-correction bias is stored exactly where vLLM creates one."""
    if block.bias is None and spec.bias_required(text.get):
        if spec.bias_required_when is None:
            why = f"vLLM always creates and loads {spec.model_type}'s"
        else:
            key, value = spec.bias_required_when
            why = (
                f"config.json has {key}={value!r}, for which vLLM creates and loads the"
            )
        report.add(
            "missing-correction-bias",
            f"{block.name}.{spec.hub_bias}",
            f"{why} score-correction bias, but the checkpoint has none",
            "save the checkpoint again from a model that has the bias",
        )
    if block.bias is not None and not spec.bias_required(text.get):
        key, value = spec.bias_required_when or ("", None)
        report.add(
            "unexpected-correction-bias",
            block.bias.disk,
            f"stores a score-correction bias, but vLLM creates {spec.model_type}'s "
            f"only for {key}={value!r} (config.json has {text.get(key)!r}) and "
            "fails on a checkpoint tensor it has no parameter for",
            f"set {key}={value!r} in config.json if the model routes with the bias, "
            "or drop the tensor",
        )


@dataclass
class ConfigKeys:
    """Where a family's routing keys are read in ``config.json``.

    :param text: the (text) config's keys
    :param prefix: how the report names them (``text_config.`` for VL wrappers)
    """

    spec: MoEArchSpec
    text: dict[str, Any]
    prefix: str


def check_config_counts(report: CheckReport, config: ConfigKeys, count: int) -> None:
    spec, text, prefix = config.spec, config.text, config.prefix
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


def check_routing(report: CheckReport, config: ConfigKeys, count: int) -> None:
    spec, text, prefix = config.spec, config.text, config.prefix
    top_k = text.get(spec.top_k_key)
    n_group, topk_group = spec.groups(text.get, as_vllm=True)
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
    if n_group is None:
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
    # vLLM scores a group by its top-2 sum when the router has a correction
    # bias, else by its best expert (fused_moe/router/grouped_topk_router.py)
    if spec.bias_required(text.get) and per_group < 2:
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
