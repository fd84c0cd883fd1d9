"""
Multi-token-prediction (MTP) layers, carried from the source checkpoint into
the output.

DeepSeek-V3/V3.2, Kimi-K2, GLM-4.5+/GLM-5 store ``num_nextn_predict_layers``
MTP layers after the trunk, as ``model.layers.{num_hidden_layers + i}``: a
decoder layer with its own routed experts, plus ``enorm``, ``hnorm``,
``eh_proj`` and ``shared_head``. Qwen3-Next and Qwen3.5/3.6 store a separate
module, ``mtp.layers.{i}`` (decoder layers with routed experts) beside
``mtp.fc`` and its norms. transformers does not build them, so a plain
save drops them, and vLLM's MTP speculative decoding then refuses the
checkpoint; kept at full width, they would not load either (vLLM builds every
MoE layer with the config's one expert count).

Here each MTP layer is copied from the source files, its routed experts reduced
to the trunk's count. The reduction follows a documented rule rather than the
trunk's method: the experts are ranked by AIMER's weight-only score (mean|w| /
RMS(w) over the expert's weights, highest removed, arXiv 2603.18492), which
needs no calibration data. Running the MTP layer on calibration data (its
inputs are the trunk's last hidden states and the next token's embedding) to
apply REAP/REAM faithfully is not done: transformers has no module for it.
Router rows and the selection bias follow the kept experts; every other MTP
tensor is copied unchanged. MTP weights stay unquantized, and a quantized
output lists them in ``quantization_config.ignore`` so that vLLM builds them so.

Memory: one MTP layer's tensors at a time.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from loguru import logger

from ream_modifiers.moe.architectures import MoEArchSpec

__all__ = ["MTP_RULE", "MTPLayer", "carry_mtp_layers", "find_mtp_layers"]

MTP_RULE = "aimer"
_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"
_SHARD = "model-mtp-{:05d}.safetensors"


@dataclass(frozen=True)
class MTPLayer:
    """One MTP layer in a checkpoint: its prefix and its tensors' files."""

    prefix: str  # e.g. "model.layers.61"
    files: dict[str, Path]  # tensor name -> the file holding it

    @property
    def block(self) -> str:
        return f"{self.prefix}.mlp"


def _tensor_files(directory: Path) -> dict[str, Path]:
    """
    Every tensor of a safetensors checkpoint and the file holding it, from the
    index where there is one. (compressed-tensors' ``get_weight_mappings``
    reads ``model.safetensors`` first and would miss the MTP shards that
    llm-compressor's own copy lists in an index beside it.)
    """
    index = directory / _INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: directory / file for name, file in weight_map.items()}
    single = directory / _SINGLE
    if not single.is_file():
        return {}
    from safetensors import safe_open

    with safe_open(single, "pt") as handle:
        return dict.fromkeys(handle.keys(), single)


def _mtp_count(spec: MoEArchSpec, config: dict[str, Any]) -> int:
    if spec.mtp_layers_key is None:
        return 0
    count = config.get(spec.mtp_layers_key) or 0
    return count if isinstance(count, int) else 0


def find_mtp_layers(
    directory: Path, spec: MoEArchSpec, config: dict[str, Any]
) -> list[MTPLayer]:
    """
    The MTP layers ``directory`` stores: after the trunk, as many as the config
    declares (a config that declares them without weights, as transformers'
    defaults do, has none), or every ``{mtp_module}.layers.{i}`` of a separate
    MTP module, whose other tensors (``mtp.fc``, its norms) come as one more
    entry without experts.

    :param config: the text model's config as a dict
    """
    files = _tensor_files(directory)
    if spec.mtp_module is not None:
        return _module_layers(files, spec.mtp_module)
    count = _mtp_count(spec, config)
    if not count:
        return []
    first = config["num_hidden_layers"]
    layers = []
    for index in range(first, first + count):
        prefix = f"model.layers.{index}"
        mine = {n: f for n, f in files.items() if n.startswith(prefix + ".")}
        if mine:
            layers.append(MTPLayer(prefix, mine))
    return layers


def _module_layers(files: dict[str, Path], module: str) -> list[MTPLayer]:
    """The layers of an MTP module (``mtp.layers.{i}``), then its other tensors."""
    inside = {n: f for n, f in files.items() if n.startswith(module + ".")}
    pattern = re.compile(rf"^({re.escape(module)}\.layers\.\d+)\.")
    prefixes = sorted({m[1] for n in inside if (m := pattern.match(n))})
    layers = [
        MTPLayer(p, {n: f for n, f in inside.items() if n.startswith(p + ".")})
        for p in prefixes
    ]
    rest = {n: f for n, f in inside.items() if not pattern.match(n)}
    return layers + ([MTPLayer(module, rest)] if rest else [])


def _expert_pattern(layer: MTPLayer, spec: MoEArchSpec) -> re.Pattern:
    return re.compile(
        rf"^{re.escape(layer.block)}\.{re.escape(spec.experts_attr)}\.(\d+)\.(.+)$"
    )


def _load(names: list[str], files: dict[str, Path]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    tensors = {}
    for file in sorted({files[n] for n in names}):
        with safe_open(file, "pt") as handle:
            wanted = [n for n in names if files[n] == file]
            tensors.update({n: handle.get_tensor(n) for n in wanted})
    return tensors


def _reduce_layer(
    layer: MTPLayer, spec: MoEArchSpec, kept_count: int, n_group: int | None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The layer's tensors with ``kept_count`` routed experts, and its report."""
    from ream_modifiers.engines.selection import ExpertBudget, select_kept
    from ream_modifiers.modifiers.aimer.score import aimer_score_experts

    tensors = _load(list(layer.files), layer.files)
    pattern = _expert_pattern(layer, spec)
    per_expert: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        if match := pattern.match(name):
            per_expert.setdefault(int(match[1]), {})[match[2]] = tensor
    count = len(per_expert)
    if not count:  # the MTP module's own tensors (fc, norms): copied unchanged
        return tensors, {}
    scores = aimer_score_experts(
        [t for key, t in sorted(weights.items()) if key.endswith("weight")]
        for _, weights in sorted(per_expert.items())
    )
    budget = ExpertBudget(num_experts=count, kept=kept_count, n_group=n_group)
    kept = select_kept(scores, budget, remove="highest")
    out = {n: t for n, t in tensors.items() if not pattern.match(n)}
    for new, old in enumerate(kept):
        for key, tensor in per_expert[old].items():
            out[f"{layer.block}.{spec.experts_attr}.{new}.{key}"] = tensor
    index = torch.tensor(kept)
    for name in _routing_tensors(layer, spec):
        if name in out and out[name].shape[-1 if "bias" in name else 0] == count:
            dim = out[name].dim() - 1 if "bias" in name else 0
            out[name] = out[name].index_select(dim, index).contiguous()
    report = {
        "rule": MTP_RULE,
        "kept": kept,
        "removed": sorted(set(range(count)) - set(kept)),
        "scores": scores.tolist(),
    }
    return out, report


def _routing_tensors(layer: MTPLayer, spec: MoEArchSpec) -> list[str]:
    """The router weight and selection bias, whose expert dim follows the kept."""
    names = [f"{layer.block}.{spec.router_attr}.weight"]
    if spec.hub_bias:
        names.append(f"{layer.block}.{spec.hub_bias}")
    return names


def carry_mtp_layers(
    source: Path,
    target: Path,
    spec: MoEArchSpec,
    config: dict[str, Any],
    kept_count: int,
    n_group: int | None,
) -> dict[str, Any]:
    """
    Write ``source``'s MTP layers into the saved checkpoint ``target`` with
    ``kept_count`` routed experts each (new shards, added to the index), and
    keep them out of quantization.

    :param config: the text model's config as a dict
    :param n_group: expert groups of a group-limited router (the same number is
        kept per group), else None
    :return: per MTP layer prefix, what was kept and removed; empty when
        ``source`` has none
    """
    layers = find_mtp_layers(source, spec, config)
    if not layers:
        return {}
    from safetensors.torch import save_file

    weight_map = {name: file.name for name, file in _tensor_files(target).items()}
    _drop_unreduced_copy(target, find_mtp_layers(target, spec, config), weight_map)
    reports = {}
    for number, layer in enumerate(layers):
        tensors, report = _reduce_layer(layer, spec, kept_count, n_group)
        shard = _SHARD.format(number + 1)
        save_file(tensors, target / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard))
        if report:
            reports[layer.prefix] = report
            logger.info(
                f"MTP {layer.prefix}: kept {kept_count} routed experts by the "
                f"{MTP_RULE} rule (removed {report['removed']})"
            )
    _write_index(target, weight_map)
    roots = [spec.mtp_module] if spec.mtp_module else [x.prefix for x in layers]
    _ignore_in_quantization(target, roots)
    return reports


def _drop_unreduced_copy(
    target: Path, copied: list[MTPLayer], weight_map: dict[str, str]
) -> None:
    """
    Remove the MTP tensors already in ``target``: llm-compressor 0.14 copies a
    ``mtp.*`` module unchanged into ``model_mtp.safetensors``
    (compressed-tensors' ``save_mtp_tensors_to_checkpoint``), which at full
    width no longer loads beside reduced layers. Only shards that hold nothing
    but MTP tensors are deleted.
    """
    names = {name for layer in copied for name in layer.files}
    if not names:
        return
    for name in names:
        weight_map.pop(name, None)
    for file in {f for layer in copied for f in layer.files.values()}:
        if file.name not in set(weight_map.values()):
            file.unlink()
    logger.info(f"Replacing the unreduced copy of {len(names)} MTP tensors")


def _write_index(target: Path, weight_map: dict[str, str]) -> None:
    index = target / _INDEX
    metadata = json.loads(index.read_text())["metadata"] if index.is_file() else {}
    index.write_text(
        json.dumps({"metadata": metadata, "weight_map": weight_map}, indent=2) + "\n"
    )


def _ignore_in_quantization(target: Path, prefixes: list[str]) -> None:
    path = target / "config.json"
    config = json.loads(path.read_text())
    quantization = config.get("quantization_config")
    if not quantization:
        return
    ignore = quantization.setdefault("ignore", [])
    for prefix in prefixes:
        # llm-compressor's own MTP copy may have listed it already ("re:^mtp.*")
        covered = any(
            entry.startswith("re:") and re.match(entry[3:], f"{prefix}.x")
            for entry in ignore
        )
        if not covered:
            ignore.append(f"re:^{re.escape(prefix)}\\..*")
    path.write_text(json.dumps(config, indent=2) + "\n")
