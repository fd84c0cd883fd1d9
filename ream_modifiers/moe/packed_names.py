"""
Quantized experts under the fused per-expert names vLLM reads (gpt-oss).

compressed-tensors packs each expert projection on its own, so llm-compressor
saves a quantized gpt-oss as ``mlp.experts.{i}.gate_proj.weight_packed``,
``up_proj.*`` and ``down_proj.*``. vLLM's gpt-oss loader (``models/gpt_oss.py``,
``_GPT_OSS_STREAMED_EXPERT_SUFFIX_TO_SHARD``, vLLM 0.32) reads quantized experts
only as ``mlp.experts.{i}.w13_weight_packed``, ``w13_weight_scale``, ``w13_bias``
and the same for ``w2``, with gate and up rows interleaved (its ``swigluoai``
activation takes the gate from even and the up projection from odd rows), and
skips any other name without an error: the model would serve with
uninitialised experts. ``weight_shape`` has no name vLLM can load (a name with
``.w13_weight`` that is not one of those goes to the fused-tensor branch), and
vLLM's WNA16 MoE method takes the shapes from config.json, so it is dropped.

- :func:`write_packed_names` rewrites a saved checkpoint's expert tensors into
  those names, one shard at a time, in place.
- :func:`packed_names_load_conversions` lets transformers load such a
  checkpoint: it dequantizes the tensors into gpt-oss's fused ``gate_up_proj``
  and ``down_proj`` (the packed width gives each expert's shape).
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from pathlib import Path

import torch
from transformers.core_model_loading import (
    ConversionOps,
    MergeModulelist,
    Transpose,
    WeightConverter,
    WeightTransform,
)
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME as INDEX_FILENAME

from ream_modifiers.moe.architectures import PACKED_PARAMS, MoEArchSpec

__all__ = [
    "PACKED_PARAMS",
    "PackedNamesError",
    "packed_names_load_conversions",
    "weight_map_of",
    "write_packed_names",
]

_PROJECTION = re.compile(
    r"^(?P<expert>.+\.\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.(?P<param>\w+)$"
)
_DROPPED = ("weight_shape",)


class PackedNamesError(ValueError):
    """A quantized expert tensor that the fused names cannot carry."""


def _interleave_rows(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Rows gate_0, up_0, gate_1, up_1, ... (``swigluoai``'s w13 layout)."""
    return torch.stack((gate, up), dim=1).flatten(0, 1)


def weight_map_of(directory: Path) -> dict[str, str]:
    """Every stored tensor of a checkpoint and its file name (the index's map,
    or the shards' headers)."""
    from safetensors import safe_open

    index = directory / INDEX_FILENAME
    if index.is_file():
        return json.loads(index.read_text())["weight_map"]
    names = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, "pt") as handle:
            names.update(dict.fromkeys(handle.keys(), file.name))
    return names


def _plan(
    weight_map: dict[str, str], spec: MoEArchSpec
) -> dict[str, tuple[str, str | None, str]]:
    """
    ``{new name: (source name, its up partner or None, file to write it in)}`` for
    every per-projection expert tensor, and the dropped ones mapped to "".
    """
    gate_up, down = spec.packed_expert_names or ("", "")
    experts = f".{spec.experts_attr}."
    plan: dict[str, tuple[str, str | None, str]] = {}
    for name, file in weight_map.items():
        match = _PROJECTION.match(name)
        if match is None or experts not in name:
            continue
        expert, proj, param = match["expert"], match["proj"], match["param"]
        if f"{expert}.{proj}.weight_packed" not in weight_map:
            continue  # not quantized: saved fused by the family's conversions
        if param in _DROPPED:
            plan[name] = (name, None, "")
        elif param not in PACKED_PARAMS:
            raise PackedNamesError(
                f"{name}: vLLM's {spec.model_type} loader reads quantized experts "
                f"only as {gate_up}_/{down}_{{{', '.join(PACKED_PARAMS)}}}, so "
                f"{param!r} (an asymmetric or activation-ordered scheme) cannot be "
                "served; quantize the experts with a symmetric scheme without "
                "group activation ordering (W4A16), or ignore them"
            )
        elif proj == "down_proj":
            plan[f"{expert}.{down}_{param}"] = (name, None, file)
        elif proj == "gate_proj":
            up = f"{expert}.up_proj.{param}"
            if up not in weight_map:
                raise PackedNamesError(f"{name} has no {up} to pair with")
            plan[f"{expert}.{gate_up}_{param}"] = (name, up, file)
    return plan


def write_packed_names(directory: str | os.PathLike, spec: MoEArchSpec) -> int:
    """
    Rewrite the per-projection quantized expert tensors of the checkpoint in
    ``directory`` under ``spec.packed_expert_names``, shard by shard (memory: one
    shard and the partners it needs), and update the index. Returns the number
    of tensors written; 0 for a checkpoint without such tensors.

    :raises PackedNamesError: for a tensor the fused names cannot carry (zero
        points, ``g_idx``), before any file is changed
    """
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    directory = Path(directory)
    weight_map = weight_map_of(directory)
    plan = _plan(weight_map, spec)
    if not plan:
        return 0
    consumed = {source for source, partner, _ in plan.values()} | {
        partner for _, partner, _ in plan.values() if partner
    }
    by_file: dict[str, list[str]] = defaultdict(list)
    for new, (_, _, file) in plan.items():
        if file:
            by_file[file].append(new)
    # partners stored in another shard than their gate (at most a few experts at
    # shard boundaries), read before any shard changes
    strays = {}
    for _, partner, file in plan.values():
        if partner and weight_map[partner] != file:
            with safe_open(directory / weight_map[partner], "pt") as handle:
                strays[partner] = handle.get_tensor(partner)
    written = 0
    for file in sorted({weight_map[name] for name in consumed}):
        original = load_file(directory / file)
        tensors = {k: v for k, v in original.items() if k not in consumed}
        for new in by_file.get(file, []):
            source, partner, _ = plan[new]
            tensor = original[source]
            if partner is not None:
                other = original[partner] if partner in original else strays[partner]
                tensor = _interleave_rows(tensor, other)
            tensors[new] = tensor.contiguous()
            written += 1
        partial = directory / f"{file}.partial"
        save_file(tensors, partial, metadata={"format": "pt"})
        os.replace(partial, directory / file)
        del original, tensors
    _rewrite_index(directory, weight_map, consumed, plan)
    return written


def _rewrite_index(
    directory: Path,
    weight_map: dict[str, str],
    consumed: set[str],
    plan: dict[str, tuple[str, str | None, str]],
) -> None:
    index = directory / INDEX_FILENAME
    if not index.is_file():
        return
    content = json.loads(index.read_text())
    new_map = {k: v for k, v in weight_map.items() if k not in consumed}
    new_map.update({new: file for new, (_, _, file) in plan.items() if file})
    content["weight_map"] = dict(sorted(new_map.items()))
    index.write_text(json.dumps(content, indent=2) + "\n")


class DequantizeInt4Experts(ConversionOps):
    """
    Per-expert symmetric int4 ``weight_packed`` [rows, cols / 8] and group
    ``weight_scale`` [rows, groups] -> the stacked dense weights [E, rows, cols],
    in the scale's dtype (int4 times the scale is exact in float32, then rounded
    once, as vLLM's dequantization does).
    """

    @torch.no_grad()
    def convert(self, input_dict, source_patterns, target_patterns, **kwargs):
        from compressed_tensors.compressors.pack_quantized.helpers import (
            unpack_from_int32,
        )

        packed_key = next(k for k in input_dict if "weight_packed" in k)
        scale_key = next(k for k in input_dict if "weight_scale" in k)
        packed, scales = input_dict[packed_key], input_dict[scale_key]
        dense = []
        for words, scale in zip(packed, scales, strict=True):
            shape = torch.Size([words.shape[0], words.shape[1] * 8])
            values = unpack_from_int32(words, 4, shape).float()
            group = values.shape[1] // scale.shape[1]
            weight = values * scale.float().repeat_interleave(group, dim=1)
            dense.append(weight.to(scale.dtype))
        return {packed_key: torch.stack(dense)}

    @property
    def reverse_op(self) -> ConversionOps:  # pragma: no cover - load only
        raise NotImplementedError("save writes these names with write_packed_names")


def packed_names_load_conversions(spec: MoEArchSpec) -> list[WeightTransform]:
    """
    transformers ``WeightConverter``s from ``experts.{i}.<w13|w2>_*`` to gpt-oss's
    fused experts: ``gate_up_proj`` [E, H, 2I] (gate/up interleaved along the
    last dim, as the w13 rows are) and ``down_proj`` [E, I, H], with biases.
    """
    gate_up, down = spec.packed_expert_names or ("", "")
    experts = f"mlp.{spec.experts_attr}"
    conversions: list[WeightTransform] = []
    for prefix, fused in ((gate_up, "gate_up_proj"), (down, "down_proj")):
        conversions += [
            WeightConverter(
                [
                    f"{experts}.*.{prefix}_weight_packed$",
                    f"{experts}.*.{prefix}_weight_scale$",
                ],
                f"{experts}.{fused}",
                [DequantizeInt4Experts(), MergeModulelist(dim=0), Transpose(1, 2)],
            ),
            WeightConverter(
                f"{experts}.*.{prefix}_bias$",
                f"{experts}.{fused}_bias",
                [MergeModulelist(dim=0)],
            ),
        ]
    return conversions
