"""
``ream-compress check``: verify that a saved MoE checkpoint has what vLLM needs.

Only ``config.json`` and the safetensors headers (and index) are read, never the
weights, so checking a trillion-parameter checkpoint takes seconds. The rules:

- every MoE layer stores the same number of experts, N, as indices ``0..N-1``,
  each with the same complete set of per-expert tensors (names from the
  architecture table, hub renames such as Mixtral's ``w1/w2/w3`` included);
- router rows, router bias and score-correction bias have N entries;
- ``N % n_group == 0`` and top-k is reachable (``top_k <= N`` and, with groups,
  ``top_k <= topk_group * N / n_group``);
- every config key of the family that stores the expert count equals N;
- routers are stored unquantized and covered by ``quantization_config.ignore``;
- the compressed-tensors ``quantization_config`` matches the tensors present.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loguru import logger

from ream_modifiers.moe.architectures import ARCHITECTURES, MoEArchSpec, detect_spec

__all__ = [
    "CheckReport",
    "CheckpointCheckError",
    "Violation",
    "check_checkpoint",
]

INDEX_FILENAME = "model.safetensors.index.json"
# parameters that only a quantized module stores
_QUANT_PARAMS = frozenset(
    {
        "weight_packed",
        "weight_scale",
        "weight_shape",
        "weight_zero_point",
        "weight_global_scale",
        "weight_g_idx",
    }
)
_ROUTER_FIX = (
    "keep routers in full precision: compress again with the expert modifier's "
    "protect_routers: true (the default), or add {pattern!r} to the quantization "
    "modifier's ignore list"
)


@dataclass(frozen=True)
class Violation:
    """
    One broken rule.

    :param code: stable identifier of the rule (e.g. ``missing-expert-tensors``)
    :param where: the layer, tensor or config key at fault
    :param message: what is wrong and what vLLM would do with it
    :param fix: how to repair it
    """

    code: str
    where: str
    message: str
    fix: str

    def __str__(self) -> str:
        return f"[{self.code}] {self.where}: {self.message}\n    fix: {self.fix}"


@dataclass
class CheckReport:
    """What :func:`check_checkpoint` found."""

    path: Path
    model_type: str | None = None
    experts_per_layer: dict[str, int] = field(default_factory=dict)
    quantization_format: str | None = None
    violations: list[Violation] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations

    @property
    def codes(self) -> list[str]:
        return [v.code for v in self.violations]

    def add(self, code: str, where: str, message: str, fix: str) -> None:
        self.violations.append(Violation(code, where, message, fix))

    def describe(self) -> str:
        """What was found, e.g. ``qwen3_moe, 2 MoE layers x 6 experts, ...``."""
        counts = sorted(set(self.experts_per_layer.values()))
        return (
            f"{self.model_type}, {len(self.experts_per_layer)} MoE layers x "
            f"{'/'.join(map(str, counts)) or '?'} experts, "
            f"{self.quantization_format or 'unquantized'}"
        )

    def summary(self) -> str:
        head = f"{self.path}: {self.describe()}"
        if self.ok:
            return f"OK {head}"
        lines = [f"FAILED {head}: {len(self.violations)} problem(s)"]
        return "\n".join(lines + [str(v) for v in self.violations])

    def raise_for_violations(self) -> None:
        """:raises CheckpointCheckError: if any rule is broken"""
        if not self.ok:
            raise CheckpointCheckError(self)


class CheckpointCheckError(ValueError):
    """A checkpoint broke a rule vLLM depends on."""

    def __init__(self, report: CheckReport):
        super().__init__(report.summary())
        self.report = report


# -- the checkpoint's layout, from headers only ----------------------------------


@dataclass
class _Tensor:
    disk: str  # the name in the checkpoint
    shape: tuple[int, ...]


@dataclass
class _Block:
    """One MoE block's tensors: experts[index][projection][parameter]."""

    name: str  # the block's name as stored
    experts: dict[int, dict[str, dict[str, _Tensor]]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(dict))
    )
    router: dict[str, _Tensor] = field(default_factory=dict)
    block_params: dict[str, _Tensor] = field(default_factory=dict)
    gate_module: str | None = None  # stored name of the shared-expert gate

    @property
    def count(self) -> int:
        return max(self.experts) + 1 if self.experts else 0


def _read_shapes(directory: Path, report: CheckReport) -> dict[str, tuple[int, ...]]:
    """Every tensor name and shape, from the safetensors headers."""
    from safetensors import safe_open

    index_path = directory / INDEX_FILENAME
    weight_map: dict[str, str] | None = None
    if index_path.is_file():
        weight_map = json.loads(index_path.read_text()).get("weight_map", {})
        files = sorted({directory / name for name in weight_map.values()})
    else:
        files = sorted(directory.glob("*.safetensors"))
    if not files:
        report.add(
            "no-weights",
            str(directory),
            "no *.safetensors files",
            "save the model with save_pretrained (safe_serialization is the default)",
        )
    shapes: dict[str, tuple[int, ...]] = {}
    stored_in: dict[str, str] = {}
    for file in files:
        if not file.is_file():
            report.add(
                "missing-shard",
                file.name,
                f"{INDEX_FILENAME} lists {file.name}, which does not exist",
                "copy the missing shard or save the checkpoint again",
            )
            continue
        with safe_open(file, "pt") as handle:
            for name in handle.keys():
                shapes[name] = tuple(handle.get_slice(name).get_shape())
                stored_in[name] = file.name
    for name, file in (weight_map or {}).items():
        if (directory / file).is_file() and stored_in.get(name) != file:
            report.add(
                "index-mismatch",
                name,
                f"{INDEX_FILENAME} maps it to {file}, which does not hold it",
                "save the checkpoint again; a sharded copy is incomplete",
            )
    return shapes


def _to_memory(name: str, spec: MoEArchSpec) -> str:
    """The in-memory (linearized) name of a stored tensor (undo hub renames)."""
    for disk, memory in spec.linear_save_renames:
        name = re.sub(disk, memory, name)
    return name


def _blocks(
    shapes: dict[str, tuple[int, ...]], spec: MoEArchSpec
) -> tuple[dict[str, _Block], list[str]]:
    """MoE blocks keyed by in-memory name, and fused expert tensors found."""
    experts = re.escape(spec.experts_attr)
    expert_re = re.compile(
        rf"^(?P<block>.+)\.{experts}\.(?P<index>\d+)\.(?P<proj>[^.]+)\.(?P<param>[^.]+)$"
    )
    fused_re = re.compile(rf"^.+\.{experts}\.\w*(gate_up|up|down|gate)_proj\w*$")
    router_re = re.compile(
        rf"^(?P<block>.+)\.{re.escape(spec.router_attr)}\.(?P<param>[^.]+)$"
    )
    blocks: dict[str, _Block] = {}
    fused: list[str] = []
    routers: list[tuple[str, str, _Tensor]] = []
    others: list[tuple[str, _Tensor]] = []
    for disk, shape in shapes.items():
        memory = _to_memory(disk, spec)
        tensor = _Tensor(disk, shape)
        if match := expert_re.match(memory):
            stored = disk[: disk.rindex(f".{spec.experts_attr}.{match['index']}.")]
            block = blocks.setdefault(match["block"], _Block(stored))
            block.experts[int(match["index"])][match["proj"]][match["param"]] = tensor
        elif fused_re.match(memory):
            fused.append(disk)
        elif match := router_re.match(memory):
            routers.append((match["block"], match["param"], tensor))
        else:
            others.append((memory, tensor))
    # a router whose experts are all gone still marks an MoE block
    suffixes = {name.rsplit(".", 1)[-1] for name in blocks}
    for name, param, tensor in routers:
        if name in blocks or name.rsplit(".", 1)[-1] in suffixes:
            stored = tensor.disk[: tensor.disk.rindex(f".{param}")]
            stored = stored[: stored.rindex(".")]
            blocks.setdefault(name, _Block(stored)).router[param] = tensor
    gate = spec.shared_expert_gate_attr
    for memory, tensor in others:
        block_name, _, param = memory.rpartition(".")
        if block_name in blocks:
            blocks[block_name].block_params[param] = tensor
        elif gate and block_name.endswith(f".{gate}"):
            owner = blocks.get(block_name.removesuffix(f".{gate}"))
            if owner is not None:
                owner.gate_module = tensor.disk.rsplit(".", 1)[0]
    return dict(sorted(blocks.items(), key=lambda kv: _natural(kv[0]))), fused


def _natural(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


# -- the rules ----------------------------------------------------------------------


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
    nested = isinstance(config.get("text_config"), dict)
    text = config["text_config"] if nested else config
    prefix = "text_config." if nested else ""
    report.model_type = text.get("model_type")
    spec = _spec(text, report)
    if spec is None:
        return report
    shapes = _read_shapes(directory, report)
    blocks, fused = _blocks(shapes, spec)
    if fused:
        report.add(
            "fused-experts",
            fused[0],
            f"{len(fused)} fused expert tensors (e.g. {fused[0]}); vLLM and "
            "compressed-tensors expect per-expert "
            f"{spec.experts_attr}.{{i}}.<proj>.weight tensors",
            "load the model with ream_modifiers.moe.load_moe_model (per-expert "
            "Linear modules) before compressing, and save with transformers' "
            "default save_original_format=True",
        )
    if not any(block.experts for block in blocks.values()):
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
    _check_uniform(report, blocks)
    _check_shapes(report, blocks)
    for block in blocks.values():
        _check_complete(report, block, spec)
        _check_router(report, block, spec, text)
    counts = set(report.experts_per_layer.values())
    if len(counts) == 1:
        count = counts.pop()
        _check_config_counts(report, spec, text, prefix, count)
        _check_routing(report, spec, text, prefix, count)
    _check_quantization(report, config, blocks, shapes, spec)
    return report


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


def _check_uniform(report: CheckReport, blocks: dict[str, _Block]) -> None:
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


def _check_shapes(report: CheckReport, blocks: dict[str, _Block]) -> None:
    """vLLM stacks every layer's experts into one tensor: one shape per tensor."""
    tensors: dict[tuple[str, str], list[_Tensor]] = defaultdict(list)
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


def _check_complete(report: CheckReport, block: _Block, spec: MoEArchSpec) -> None:
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


def _check_router(
    report: CheckReport, block: _Block, spec: MoEArchSpec, text: dict[str, Any]
) -> None:
    n = block.count
    router = f"{block.name}.{spec.router_attr}"
    fix = (
        "slice router rows and biases together with the experts "
        "(ream_modifiers.moe.keep_experts does both)"
    )
    weight = block.router.get("weight")
    if weight is None and not _QUANT_PARAMS & block.router.keys():
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


def _check_config_counts(
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


def _check_routing(
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


# -- quantization -------------------------------------------------------------------


def _match(name: str, target: str) -> bool:
    """compressed-tensors' name matching: ``re:`` prefix is a regex, else exact."""
    if target.startswith("re:"):
        return re.match(target.removeprefix("re:"), name) is not None
    return target == name


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


def _check_quantization(
    report: CheckReport,
    config: dict[str, Any],
    blocks: dict[str, _Block],
    shapes: dict[str, tuple[int, ...]],
    spec: MoEArchSpec,
) -> None:
    modules: dict[str, set[str]] = defaultdict(set)
    for name in shapes:
        module, _, param = name.rpartition(".")
        modules[module].add(param)
    quantized = sorted(m for m, params in modules.items() if params & _QUANT_PARAMS)
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
    groups: dict[str, dict[str, Any]] = qconfig.get("config_groups") or {}
    ignore: list[str] = qconfig.get("ignore") or []
    fmt = qconfig.get("format")
    report.quantization_format = fmt

    def ignored(module: str) -> bool:
        return any(_match(module, target) for target in ignore)

    def group_format(name: str) -> str | None:
        return groups[name].get("format") or fmt

    # routers and shared-expert gates: never quantized, routers always ignored
    pattern = next(
        (p for p in spec.quantization_ignore if p.startswith("re:")), "lm_head"
    )
    for block in blocks.values():
        if not block.router:
            continue
        any_param = next(iter(block.router.values()))
        router = any_param.disk[: any_param.disk.rindex(".")]
        for module in [router] + ([block.gate_module] if block.gate_module else []):
            packed = sorted(modules[module] & _QUANT_PARAMS)
            if packed:
                report.add(
                    "quantized-router",
                    f"{module}.{packed[0]}",
                    f"router {module} is stored quantized ({', '.join(packed)}); "
                    "quantized routers pick the wrong experts or load as zeros",
                    _ROUTER_FIX.format(pattern=pattern),
                )
        if not ignored(router) and _group_for(groups, router, linear=True):
            report.add(
                "router-not-ignored",
                router,
                "router is not covered by quantization_config.ignore, so vLLM "
                "creates a quantized layer for it (its router is a Linear) and "
                "expects quantized tensors",
                f"add {router!r} (or {pattern!r}) to quantization_config.ignore and "
                "keep the router unquantized",
            )
    # every quantized module carries its format's tensors and is not ignored
    for module in quantized:
        params = modules[module]
        if ignored(module):
            report.add(
                "ignored-but-quantized",
                module,
                f"listed in quantization_config.ignore but stores "
                f"{sorted(params & _QUANT_PARAMS)}; vLLM loads it as unquantized",
                "remove it from ignore, or store it unquantized (plain weight)",
            )
            continue
        group = _group_for(groups, module, linear=True)
        if group is None:
            continue
        required = _required_params(groups[group], group_format(group))
        missing = [p for p in required if p not in params]
        if missing:
            report.add(
                "incomplete-quantized-tensors",
                module,
                f"quantized as {group_format(group)} by config_groups.{group} but "
                f"lacks {missing} (has {sorted(params)})",
                "save again from the quantized model; the quantization_config must "
                "describe the tensors actually stored",
            )
    # experts the config says are quantized must be stored quantized
    for block in blocks.values():
        plain = []
        for projections in block.experts.values():
            for params in projections.values():
                tensor = next(iter(params.values()))
                module = tensor.disk[: tensor.disk.rindex(".")]
                if modules[module] & _QUANT_PARAMS or ignored(module):
                    continue
                group = _group_for(groups, module, linear=True)
                if group is not None:
                    plain.append((module, group))
        if plain:
            module, group = plain[0]
            report.add(
                "unquantized-experts",
                block.name,
                f"{len(plain)} expert projections (e.g. {module}) are targeted by "
                f"config_groups.{group} ({group_format(group)}) but stored "
                "unquantized; vLLM would look for quantized tensors",
                "quantize every expert (moe_calibrate_all_experts=True) or list the "
                "unquantized ones in quantization_config.ignore",
            )
