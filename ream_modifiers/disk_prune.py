"""
Prune a checkpoint on disk from a report, without loading the model.

A pruning run's report (``expert_reduction.json``) names the experts each
layer kept. :func:`prune_on_disk` applies those decisions to a checkpoint in
its hub layout, one safetensors shard at a time: kept experts' tensors are
renumbered, the others dropped, and the tensors indexed by expert (router rows,
router and selection biases, fused expert stacks) are sliced to the kept
experts. Memory is one shard's tensors; nothing else of the model is read.

The layout comes from the checkpoint checker's reading of the safetensors
headers (:func:`ream_modifiers.check.layout.find_blocks`), so every family the
checker knows is handled alike. A merge or a recombination rewrites weights
from calibration statistics and cannot be replayed from a report: those are
refused (compress with ``--from-stats`` instead, which skips calibration).
The result is staged beside ``output``, checked with
:func:`ream_modifiers.check.check_checkpoint`, and renamed into place only if
the check passes.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from loguru import logger
from safetensors import safe_open
from safetensors.torch import save_file

from ream_modifiers.check import check_checkpoint
from ream_modifiers.check.layout import (
    INDEX_FILENAME,
    MoEBlock,
    StoredTensor,
    find_blocks,
)
from ream_modifiers.check.report import CheckReport
from ream_modifiers.moe.architectures import ARCHITECTURES, text_config_entry
from ream_modifiers.moe.per_layer import (
    PER_LAYER_KEY,
    per_layer_entry,
    per_layer_family,
)
from ream_modifiers.output import refuse_existing, staging_dir
from ream_modifiers.registry import method_for_report
from ream_modifiers.saving import REPORT_FILENAME

__all__ = [
    "DiskPruneError",
    "Edit",
    "Edits",
    "copy_other_files",
    "expert_indexed",
    "prune_on_disk",
    "renumbered",
    "rewrite_checkpoint",
    "set_expert_counts",
    "stored_tensors",
    "write_shards",
]


class DiskPruneError(ValueError):
    """A report that cannot be applied to this checkpoint on disk."""


@dataclass(frozen=True)
class Edit:
    """
    One tensor written from a stored one: its name, and along ``dim`` the
    stored rows in ``rows`` order, a None row being filled with ``fill``
    (``rows`` None: the tensor as stored). ``blank``: written as zeros where
    floating point (a padded expert: int4 values times a zero scale are zero).
    """

    name: str
    rows: tuple[int | None, ...] | None = None
    dim: int = 0
    fill: float = 0.0
    blank: bool = False

    def apply(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.blank:  # a copy of its own: safetensors refuses shared storage
            floating = tensor.is_floating_point()
            tensor = torch.zeros_like(tensor) if floating else tensor.clone()
        if self.rows is None:
            return tensor
        size = list(tensor.shape)
        size[self.dim] = 1
        filler = torch.full(size, self.fill, dtype=tensor.dtype)
        parts = [
            filler if row is None else tensor.narrow(self.dim, row, 1)
            for row in self.rows
        ]
        return torch.cat(parts, dim=self.dim).contiguous()


# stored name -> what is written from it (an empty list drops it)
Edits = dict[str, list[Edit]]


def prune_on_disk(
    source: str | Path,
    report: str | Path | dict[str, Any],
    output: str | Path,
    overwrite: bool = False,
) -> CheckReport:
    """
    Write ``source`` with only the experts ``report`` kept to ``output``.

    :param source: a local checkpoint directory (config.json and safetensors)
    :param report: an ``expert_reduction.json`` path (its last entry), or one
        report entry as a dict
    :param output: the new checkpoint directory
    :param overwrite: replace a non-empty ``output``
    :return: the checker's report on the written checkpoint
    :raises DiskPruneError: if the report is not a pruning of this checkpoint
    :raises ream_modifiers.check.CheckpointCheckError: if the result breaks a
        rule vLLM depends on (nothing is written to ``output`` then)
    """
    source, output = Path(source), Path(output)
    entry = _report_entry(report)
    refuse_existing(output, overwrite)
    config = json.loads((source / "config.json").read_text())
    text, _ = text_config_entry(config)
    spec = ARCHITECTURES.get(text.get("model_type"))
    if spec is None or spec.expert_sets:
        raise DiskPruneError(
            f"{source}: model_type {text.get('model_type')!r} has no on-disk "
            "pruning (unknown family, or several expert sets per layer)"
        )
    shapes, files = stored_tensors(source)
    blocks, _ = find_blocks(shapes, spec)
    kept = _kept_per_block(entry, blocks)
    edits = _edits(blocks, kept, spec.experts_attr)

    def finish(staging: Path) -> None:
        _write_config(staging, config, spec, kept)
        applied = {**entry, "applied_on_disk_to": str(source)}
        (staging / REPORT_FILENAME).write_text(json.dumps([applied], indent=2))

    check = rewrite_checkpoint(source, output, files, edits, finish)
    logger.info(f"Pruned {source} on disk into {output}: {check.describe()}")
    return check


def rewrite_checkpoint(
    source: Path,
    output: Path,
    files: dict[str, list[str]],
    edits: Edits,
    finish: Callable[[Path], None],
) -> CheckReport:
    """
    Write ``source``'s shards with ``edits`` and its other files to a staging
    directory beside ``output``, let ``finish`` write the config and report
    there, check it, and rename it to ``output`` only if the check passes.

    :raises ream_modifiers.check.CheckpointCheckError: if it does not
    """
    staging = staging_dir(output)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        weight_map = write_shards(source, files, edits, staging)
        copy_other_files(source, staging, files)
        if len(files) > 1:
            (staging / INDEX_FILENAME).write_text(
                json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2)
            )
        finish(staging)
        check = check_checkpoint(staging)
        check.raise_for_violations()
        if output.exists():
            shutil.rmtree(output)
        staging.rename(output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return check


def _report_entry(report: str | Path | dict[str, Any]) -> dict[str, Any]:
    if not isinstance(report, dict):
        loaded = json.loads(Path(report).read_text())
        report = loaded[-1] if isinstance(loaded, list) else loaded
    method = method_for_report(report)
    if method is None or method.kind != "prune":
        kind = "unknown" if method is None else method.kind
        raise DiskPruneError(
            f"the report's method {report.get('method')!r} ({kind}) is not a "
            "pruning: merged or recombined experts are new weights that the report "
            "does not hold. Compress with `--from-stats` instead (no calibration "
            "pass)"
        )
    return report


def stored_tensors(source: Path) -> tuple[dict[str, tuple], dict[str, list[str]]]:
    """Every tensor's shape, and each shard's tensor names (headers only)."""
    shapes: dict[str, tuple] = {}
    files: dict[str, list[str]] = {}
    for shard in sorted(source.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as handle:
            files[shard.name] = list(handle.keys())
            for name in files[shard.name]:
                shapes[name] = tuple(handle.get_slice(name).get_shape())
    if not files:
        raise DiskPruneError(f"{source} holds no *.safetensors files")
    return shapes, files


def _kept_per_block(
    entry: dict[str, Any], blocks: dict[str, MoEBlock]
) -> dict[str, list[int]]:
    layers = entry.get("layers", {})
    if sorted(layers) != sorted(blocks):
        raise DiskPruneError(
            f"the report covers MoE layers {sorted(layers)}, but the checkpoint's "
            f"are {sorted(blocks)}: it is a report of another model"
        )
    kept = {}
    for name, block in blocks.items():
        layer = layers[name]
        if layer.get("experts_before", block.count) != block.count:
            raise DiskPruneError(
                f"{name}: the report decided on {layer['experts_before']} experts, "
                f"the checkpoint stores {block.count}"
            )
        kept[name] = sorted(layer["kept"])
    return kept


def _edits(
    blocks: dict[str, MoEBlock], kept: dict[str, list[int]], experts_attr: str
) -> Edits:
    """Per stored tensor of an MoE block, what is written from it."""
    edits: Edits = {}
    for name, block in blocks.items():
        chosen = kept[name]
        for index, projections in block.experts.items():
            for params in projections.values():
                for tensor in params.values():
                    edits[tensor.disk] = (
                        [Edit(renumbered(tensor.disk, experts_attr, index, new))]
                        if (new := _position(chosen, index)) is not None
                        else []
                    )
        for tensor, dim in expert_indexed(block):
            edits[tensor.disk] = [Edit(tensor.disk, tuple(chosen), dim)]
    return edits


def _position(chosen: list[int], index: int) -> int | None:
    return chosen.index(index) if index in chosen else None


def renumbered(disk: str, experts_attr: str, old: int, new: int) -> str:
    """A per-expert tensor's name with expert ``old`` as ``new``."""
    head, _, tail = disk.rpartition(f".{experts_attr}.{old}.")
    return f"{head}.{experts_attr}.{new}.{tail}"


def expert_indexed(block: MoEBlock) -> list[tuple[StoredTensor, int]]:
    """The block's tensors with one row per expert, and that dim: fused
    stacks and router rows first, a ``[1, E]`` selection bias last."""
    found = []
    indexed = [*block.fused.values(), *block.router.values(), block.bias]
    for tensor in [*indexed, *block.block_params.values()]:
        if tensor is None or block.count not in tensor.shape:
            continue
        first = tensor.shape[0] == block.count
        found.append((tensor, 0 if first else tensor.shape.index(block.count)))
    return found


def write_shards(
    source: Path, files: dict[str, list[str]], edits: Edits, staging: Path
) -> dict[str, str]:
    """Each shard rewritten with its edits (one shard in memory at a time); the
    new weight map."""
    weight_map = {}
    for shard, names in files.items():
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(source / shard), framework="pt") as handle:
            metadata = handle.metadata()
            for name in names:
                for edit in edits.get(name, [Edit(name)]):
                    tensors[edit.name] = edit.apply(handle.get_tensor(name))
                    weight_map[edit.name] = shard
        save_file(tensors, str(staging / shard), metadata=metadata)
    return weight_map


def copy_other_files(source: Path, staging: Path, files: dict) -> None:
    """Tokenizer, processor and generation files; not the weights or reports."""
    skip = {*files, INDEX_FILENAME, REPORT_FILENAME, "config.json"}
    for path in source.iterdir():
        if path.is_file() and path.name not in skip:
            shutil.copy2(path, staging / path.name)


def set_expert_counts(text: dict[str, Any], spec, count: int) -> None:
    """Every expert-count key the text config has (and the family's own) to
    ``count``."""
    for key in spec.num_experts_keys:
        if key in text or key == spec.num_experts_key:
            text[key] = count


def _write_config(staging: Path, config: dict, spec, kept: dict) -> None:
    text, _ = text_config_entry(config)
    counts = {len(chosen) for chosen in kept.values()}
    set_expert_counts(text, spec, max(counts))
    if len(counts) > 1:
        if per_layer_family(spec.model_type) is None:
            raise DiskPruneError(
                f"the report keeps different expert counts per layer, which no "
                f"loader builds for {spec.model_type}"
            )
        layers = [(name, len(chosen)) for name, chosen in kept.items()]
        text[PER_LAYER_KEY] = per_layer_entry(layers, text["num_hidden_layers"])
    (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
