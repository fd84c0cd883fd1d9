"""
Pad a per-layer-count checkpoint to one expert count, so that stock
transformers and vLLM load it (issue 17 §2, output format (a)).

A non-uniform budget leaves layers with different expert counts
(``num_experts_per_layer``, :mod:`ream_modifiers.moe.per_layer`). Padding
gives every layer the largest count: each added expert's tensors are zero (a
quantized expert keeps its integer values and gets zero scales, so it
dequantizes to zero in any scheme), and its router row is zero with a bias of
:data:`NEVER` in the selection bias (DeepSeek-V3's ``e_score_correction_bias``)
or in the router's logit bias (gpt-oss): below every real expert on every
input, so it is never routed to and the model computes exactly as before.
A router with neither bias (Qwen3-MoE, Mixtral) has no row that loses on every
input, so padding is refused there: load those per-layer checkpoints with
``load_moe_model`` or vLLM's plugin instead.

Padding saves no memory over the largest layer's count: vLLM and transformers
allocate every layer at that count, and the checkpoint stores the zero experts.
What it gives is the per-layer allocation's quality in a checkpoint that any
loader takes. With a group-limited router the pads go at the end of each group
(membership is positional), as many in each.
"""

from __future__ import annotations

import json
from pathlib import Path

from loguru import logger

from ream_modifiers.check.layout import MoEBlock, find_blocks
from ream_modifiers.check.report import CheckReport
from ream_modifiers.disk_prune import (
    DiskPruneError,
    Edit,
    Edits,
    expert_indexed,
    renumbered,
    rewrite_checkpoint,
    set_expert_counts,
    stored_tensors,
)
from ream_modifiers.moe.architectures import ARCHITECTURES, text_config_entry
from ream_modifiers.moe.per_layer import PER_LAYER_KEY
from ream_modifiers.output import refuse_existing
from ream_modifiers.saving import REPORT_FILENAME

__all__ = ["NEVER", "pad_in_place", "pad_on_disk"]

# the bias of a padded expert: no sigmoid or softmax score plus a real bias
# comes near it, and it is exact in bfloat16 and float16 alike
NEVER = -60000.0


def pad_on_disk(
    source: str | Path, output: str | Path, overwrite: bool = False
) -> CheckReport:
    """
    Write ``source`` (a per-layer-count checkpoint) with every MoE layer padded
    to the largest count into ``output``, checked before it is published.

    :raises DiskPruneError: if ``source`` has one count already, or its router
        has no bias that can keep a padded expert from winning
    """
    source, output = Path(source), Path(output)
    refuse_existing(output, overwrite)
    config = json.loads((source / "config.json").read_text())
    text, _ = text_config_entry(config)
    spec = ARCHITECTURES.get(text.get("model_type"))
    if spec is None or text.get(PER_LAYER_KEY) is None:
        raise DiskPruneError(
            f"{source} lists no per-layer expert counts ({PER_LAYER_KEY}); there "
            "is nothing to pad"
        )
    shapes, files = stored_tensors(source)
    blocks, _ = find_blocks(shapes, spec)
    largest = max(block.count for block in blocks.values())
    groups = spec.groups(text.get, as_vllm=True)[0] or 1  # positional, as vLLM routes
    edits: Edits = {}
    for block in blocks.values():
        edits.update(_pad_block(block, largest, groups, spec.experts_attr))

    def finish(staging: Path) -> None:
        counts = text.pop(PER_LAYER_KEY)
        set_expert_counts(text, spec, largest)
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        _write_report(source, staging, counts, largest)

    check = rewrite_checkpoint(source, output, files, edits, finish)
    logger.info(f"Padded {source} to {largest} experts per layer into {output}")
    return check


def pad_in_place(directory: str | Path) -> CheckReport | None:
    """Pad ``directory`` itself (a run's staged output) if it lists per-layer
    counts (else leave it, and return None); its files are replaced by the
    padded ones."""
    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text())
    if text_config_entry(config)[0].get(PER_LAYER_KEY) is None:
        logger.info(f"{directory}: one expert count already; nothing to pad")
        return None
    padded = directory.with_name(directory.name + ".padded")
    check = pad_on_disk(directory, padded, overwrite=True)
    for path in directory.iterdir():
        if path.is_file():
            path.unlink()
    for path in padded.iterdir():
        path.rename(directory / path.name)
    padded.rmdir()
    return check


def _pad_block(block: MoEBlock, largest: int, groups: int, experts_attr: str):
    """The edits that pad one block to ``largest`` experts."""
    count = block.count
    if count == largest:
        return {}
    biased = [t for t in (block.bias, block.router.get("bias")) if t is not None]
    if not biased:
        raise DiskPruneError(
            f"{block.name}: its router has no selection or logit bias, so no "
            "router row for a padded expert loses on every input; load this "
            "per-layer checkpoint with load_moe_model or vLLM's plugin instead"
        )
    real, pads = count // groups, (largest - count) // groups
    # new position -> stored expert (None: a pad), group by group
    order: list[int | None] = []
    for group in range(groups):
        order += list(range(group * real, (group + 1) * real)) + [None] * pads
    edits: Edits = {}
    for index, projections in block.experts.items():
        donor = order.index(index)
        for params in projections.values():
            for tensor in params.values():
                moved = [Edit(renumbered(tensor.disk, experts_attr, index, donor))]
                if index % real == 0:  # the group's first expert lends its shapes
                    group_start = (index // real) * (real + pads)
                    moved += [
                        Edit(
                            renumbered(tensor.disk, experts_attr, index, position),
                            blank=True,
                        )
                        for position in range(
                            group_start + real, group_start + real + pads
                        )
                    ]
                edits[tensor.disk] = moved
    for tensor, dim in expert_indexed(block):
        fill = NEVER if any(tensor is b for b in biased) else 0.0
        edits[tensor.disk] = [Edit(tensor.disk, tuple(order), dim, fill)]
    return edits


def _write_report(source: Path, staging: Path, counts: list, largest: int) -> None:
    report_file = source / REPORT_FILENAME
    reports = json.loads(report_file.read_text()) if report_file.is_file() else []
    padded = [None if c is None else largest - c for c in counts]
    reports.append(
        {
            "padded_from": str(source),
            "num_experts_per_layer": counts,
            "padded_experts_per_layer": padded,
            "memory_saved": (
                "none over the largest layer's count: every layer is stored and "
                "served at that count, the padded experts as zeros"
            ),
        }
    )
    (staging / REPORT_FILENAME).write_text(json.dumps(reports, indent=2))
