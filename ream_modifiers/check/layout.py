"""
A checkpoint's MoE layout from its safetensors headers (and index) alone: per
block, the per-expert tensors (or the fused ones of a family whose hub layout is
fused), the router, the score-correction bias and the block's own parameters.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from ream_modifiers.check.report import CheckReport
from ream_modifiers.model_files import ModelFileError, read_safetensors_header
from ream_modifiers.moe.architectures import MoEArchSpec

__all__ = [
    "INDEX_FILENAME",
    "QUANT_PARAMS",
    "MoEBlock",
    "StoredTensor",
    "find_blocks",
    "split_expert_sets",
    "read_shapes",
]

INDEX_FILENAME = "model.safetensors.index.json"
# parameters that only a quantized module stores
QUANT_PARAMS = frozenset(
    {
        "weight_packed",
        "weight_scale",
        "weight_shape",
        "weight_zero_point",
        "weight_global_scale",
        "weight_g_idx",
    }
)


@dataclass
class StoredTensor:
    disk: str  # the name in the checkpoint
    shape: tuple[int, ...]


@dataclass
class MoEBlock:
    """
    One MoE block's tensors: ``experts[index][projection][parameter]`` (a
    family's packed names count as projections: gpt-oss's ``w13_weight_packed``
    is projection ``w13``, parameter ``weight_packed``), or ``fused[name]`` for
    the family's fused layout (expert index first).
    """

    name: str  # the block's name as stored
    experts: dict[int, dict[str, dict[str, StoredTensor]]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(dict))
    )
    fused: dict[str, StoredTensor] = field(default_factory=dict)
    router: dict[str, StoredTensor] = field(default_factory=dict)
    bias: StoredTensor | None = None  # the score-correction bias
    block_params: dict[str, StoredTensor] = field(default_factory=dict)
    gate_module: str | None = None  # stored name of the shared-expert gate
    expert_set: str | None = None  # one set of a layer's list (ERNIE-4.5-VL)

    @property
    def count(self) -> int:
        """Experts stored: highest index + 1, else the fused tensors' first dim
        (the most common one, should they disagree)."""
        if self.experts:
            return max(self.experts) + 1
        counts = Counter(t.shape[0] for t in self.fused.values() if t.shape)
        return counts.most_common(1)[0][0] if counts else 0


def read_shapes(directory: Path, report: CheckReport) -> dict[str, tuple[int, ...]]:
    """Every tensor name and shape, from the safetensors headers."""
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
        try:
            header = read_safetensors_header(file)
        except ModelFileError as error:
            report.add("unreadable-shard", file.name, error.problem, error.fix)
            continue
        for name, entry in header.items():
            if name != "__metadata__":
                shapes[name] = tuple(entry["shape"])
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


@dataclass
class _NamePatterns:
    """How a family's tensors are named on disk (after undoing hub renames)."""

    expert: re.Pattern
    fused: re.Pattern
    packed: re.Pattern | None
    router: re.Pattern
    bias: re.Pattern | None
    hub_fused: re.Pattern | None

    @classmethod
    def of(cls, spec: MoEArchSpec) -> _NamePatterns:
        experts = re.escape(spec.experts_attr)
        packed = spec.packed_expert_names
        projections = "|".join(map(re.escape, packed or ()))
        return cls(
            expert=re.compile(
                rf"^(?P<block>.+)\.{experts}\.(?P<index>\d+)\.(?P<proj>[^.]+)"
                rf"\.(?P<param>[^.]+)$"
            ),
            fused=re.compile(
                rf"^(?P<block>.+)\.{experts}\.(?P<name>\w*(gate_up|up|down|gate)_proj\w*)$"
            ),
            packed=re.compile(
                rf"^(?P<block>.+)\.{experts}\.(?P<index>\d+)\."
                rf"(?P<proj>{projections})_(?P<param>\w+)$"
            )
            if packed
            else None,
            router=re.compile(
                rf"^(?P<block>.+)\.{re.escape(spec.router_attr)}\.(?P<param>[^.]+)$"
            ),
            bias=re.compile(rf"^(?P<block>.+)\.{re.escape(spec.hub_bias)}$")
            if spec.hub_bias
            else None,
            hub_fused=re.compile(
                rf"^(?P<block>.+)\.(?P<name>"
                rf"{'|'.join(map(re.escape, spec.hub_fused_experts))})$"
            )
            if spec.hub_fused_experts
            else None,
        )


def find_blocks(
    shapes: dict[str, tuple[int, ...]], spec: MoEArchSpec
) -> tuple[dict[str, MoEBlock], list[str]]:
    """
    MoE blocks keyed by in-memory name, and the fused expert tensors that are
    not part of the family's layout (:attr:`MoEArchSpec.fused_experts`).
    """
    patterns = _NamePatterns.of(spec)
    blocks: dict[str, MoEBlock] = {}
    unexpected: list[str] = []
    routers: list[tuple[str, str, StoredTensor]] = []
    biases: list[tuple[str, StoredTensor]] = []
    others: list[tuple[str, StoredTensor]] = []
    for disk, shape in shapes.items():
        if not spec.in_scope(disk):  # another model's MoE (Qwen3-Omni's talker)
            continue
        memory = spec.memory_name(disk)
        tensor = StoredTensor(disk, shape)
        # three dims, expert index first (Granite's shared MLP has the same names)
        hub_fused = patterns.hub_fused and len(shape) == 3
        if hub_fused and (match := patterns.hub_fused.match(disk)):
            block = blocks.setdefault(match["block"], MoEBlock(match["block"]))
            block.fused[match["name"]] = tensor
        elif (patterns.packed and (match := patterns.packed.match(memory))) or (
            match := patterns.expert.match(memory)
        ):
            stored = disk[: disk.rindex(f".{spec.experts_attr}.{match['index']}.")]
            block = blocks.setdefault(match["block"], MoEBlock(stored))
            block.experts[int(match["index"])][match["proj"]][match["param"]] = tensor
        elif match := patterns.fused.match(memory):
            if match["name"] not in spec.fused_experts:
                unexpected.append(disk)
                continue
            stored = disk[: disk.rindex(f".{spec.experts_attr}.")]
            block = blocks.setdefault(match["block"], MoEBlock(stored))
            block.fused[match["name"]] = tensor
        elif patterns.bias is not None and (match := patterns.bias.match(memory)):
            biases.append((match["block"], tensor))
        elif match := patterns.router.match(memory):
            routers.append((match["block"], match["param"], tensor))
        else:
            others.append((memory, tensor))
    _attach_block_tensors(blocks, routers, biases, others, spec)
    ordered = dict(sorted(blocks.items(), key=lambda kv: natural_key(kv[0])))
    return ordered, unexpected


def _attach_block_tensors(
    blocks: dict[str, MoEBlock],
    routers: list[tuple[str, str, StoredTensor]],
    biases: list[tuple[str, StoredTensor]],
    others: list[tuple[str, StoredTensor]],
    spec: MoEArchSpec,
) -> None:
    """Give every block its router, bias, block parameters and shared gate."""
    # a router whose experts are all gone still marks an MoE block
    suffixes = {name.rsplit(".", 1)[-1] for name in blocks}

    def owner(name: str, disk: str, path: str) -> MoEBlock | None:
        if name in blocks or name.rsplit(".", 1)[-1] in suffixes:
            return blocks.setdefault(name, MoEBlock(disk[: -len(path) - 1]))
        return None

    for name, param, tensor in routers:
        path = f"{spec.router_attr}.{param}"
        if (block := owner(name, tensor.disk, path)) is not None:
            block.router[param] = tensor
    for name, tensor in biases:
        if (block := owner(name, tensor.disk, spec.hub_bias or "")) is not None:
            block.bias = tensor
    gate = spec.shared_expert_gate_attr
    for memory, tensor in others:
        block_name, _, param = memory.rpartition(".")
        if block_name in blocks:
            blocks[block_name].block_params[param] = tensor
        elif gate and block_name.endswith(f".{gate}"):
            parent = blocks.get(block_name.removesuffix(f".{gate}"))
            if parent is not None:
                parent.gate_module = tensor.disk.rsplit(".", 1)[0]


def natural_key(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def split_expert_sets(
    blocks: dict[str, MoEBlock], spec: MoEArchSpec
) -> dict[str, MoEBlock]:
    """
    For a family whose layers hold several expert sets in one stored list
    (ERNIE-4.5-VL: ``mlp.experts.{0..2E-1}``, text first, gates ``gate.weight``
    and ``gate.weight_1`` stored ``[H, E]``, the selection bias ``[2, E]``):
    each layer as one block per set, named after the set, with the set's
    experts renumbered from 0, its gate as ``[E, H]`` and its bias row, so that
    every rule checks a set as it checks an ordinary layer. A list that does not
    divide into the sets is left whole (the rules then report it).
    """
    sets = spec.expert_sets
    if not sets:
        return blocks
    split: dict[str, MoEBlock] = {}
    for name, block in blocks.items():
        count, rest = divmod(block.count, len(sets))
        if rest or not block.experts:
            split[name] = block
            continue
        for offset, set_name in enumerate(sets):
            part = MoEBlock(f"{block.name}.{set_name}", expert_set=set_name)
            for index in range(count):
                if (offset * count + index) in block.experts:
                    part.experts[index] = block.experts[offset * count + index]
            gate = block.router.get("weight" if offset == 0 else f"weight_{offset}")
            if gate is not None:
                part.router["weight"] = StoredTensor(gate.disk, gate.shape[::-1])
            if block.bias is not None and block.bias.shape[:1] == (len(sets),):
                part.bias = StoredTensor(block.bias.disk, (1, *block.bias.shape[1:]))
            if offset == 0:
                part.block_params = block.block_params
                part.gate_module = block.gate_module
            split[f"{name}.{set_name}"] = part
    return split
