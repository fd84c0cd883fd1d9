"""
Checkpoint conversion mappings (transformers ``WeightConverter`` lists) that the
MoE families here need beyond what transformers and llm-compressor register.

- gpt-oss stores its experts fused on the hub (``gate_up_proj [E, H, 2I]`` with
  gate/up interleaved along the last dim, biases, ``down_proj [E, I, H]``), and
  neither library maps per-expert tensors to or from that layout. An unquantized
  linearized gpt-oss is saved fused again (:func:`fused_save_conversions`); a
  quantized one is saved per expert under the names vLLM reads
  (:mod:`ream_modifiers.moe.packed_names`), which transformers loads inside
  :func:`per_expert_checkpoints`.
- Granite-MoE's and Qwen3-VL-MoE's transformers mappings only rename or
  transpose the hub's fused tensors, so per-expert tensors (what is saved
  here, and what vLLM reads) load back only inside
  :func:`per_expert_checkpoints`.
- Families whose hub names differ from transformers' get them back on save
  from the table's renames (:func:`hub_save_conversions`), beside
  transformers' own converters of other tensors where the row keeps them
  (Kimi-Linear's conv1d, Kimi-K2.5's vision wqkv).
- Kimi-K2 checkpoints (``model_type: kimi_k2``) load into DeepSeek-V3 classes,
  but transformers keys conversion mappings by model type and has none for
  ``kimi_k2``: its experts would silently stay random
  (:func:`register_kimi_k2_mapping`).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING

from loguru import logger
from transformers.conversion_mapping import (
    get_checkpoint_conversion_mapping,
    register_checkpoint_conversion_mapping,
)
from transformers.core_model_loading import (
    Chunk,
    Concatenate,
    Interleave,
    MergeModulelist,
    SplitModulelist,
    Transpose,
    WeightConverter,
    WeightRenaming,
    WeightTransform,
)

if TYPE_CHECKING:
    from ream_modifiers.moe.architectures import MoEArchSpec

__all__ = [
    "fused_save_conversions",
    "fused_save_conversions_outside_scope",
    "hub_save_conversions",
    "per_expert_load_conversions",
    "per_expert_checkpoints",
    "register_loaded_as_mappings",
]


def _fused_layout(spec: MoEArchSpec) -> tuple[str, bool, bool]:
    """``(experts prefix, gate/up interleaved, with biases)`` of a fused row."""
    prefix = f"{spec.hub_block_attr or 'mlp'}.{spec.experts_attr}"
    return (
        prefix,
        spec.fused_gate_up_interleaved,
        "down_proj_bias" in spec.fused_experts,
    )


def per_expert_load_conversions(spec: MoEArchSpec) -> list[WeightTransform]:
    """
    Load direction, per-expert ``nn.Linear`` tensors -> a fused-on-disk family's
    experts (``gate_up_proj [E, H, 2I]``, ``down_proj [E, I, H]``): stack the
    experts, put gate and up side by side, move the input dim first and, for
    gpt-oss, interleave gate/up columns (gate = even, up = odd).
    """
    prefix, interleaved, biases = _fused_layout(spec)
    each = f"{prefix}.*"
    gate_up = [MergeModulelist(dim=0), Concatenate(dim=1), Transpose(1, 2)]
    gate_up_bias = [MergeModulelist(dim=0), Concatenate(dim=1)]
    if interleaved:
        gate_up.append(Interleave(dim=2, inverse=True))
        gate_up_bias.append(Interleave(dim=1, inverse=True))
    conversions = [
        WeightConverter(
            [f"{each}.gate_proj.weight", f"{each}.up_proj.weight"],
            f"{prefix}.gate_up_proj",
            gate_up,
        ),
        WeightConverter(
            f"{each}.down_proj.weight",
            f"{prefix}.down_proj",
            [MergeModulelist(dim=0), Transpose(1, 2)],
        ),
    ]
    if biases:
        conversions += [
            WeightConverter(
                [f"{each}.gate_proj.bias", f"{each}.up_proj.bias"],
                f"{prefix}.gate_up_proj_bias",
                gate_up_bias,
            ),
            WeightConverter(
                f"{each}.down_proj.bias",
                f"{prefix}.down_proj_bias",
                [MergeModulelist(dim=0)],
            ),
        ]
    return conversions


def fused_save_conversions(spec: MoEArchSpec) -> list[WeightTransform]:
    """
    For ``model._weight_conversions`` of a linearized fused-on-disk family
    (gpt-oss, Llama-4): written in the load direction (fused on disk ->
    per-expert in memory), so that ``save_pretrained``, which applies the
    reverse, writes the hub's fused tensors. Only valid while the experts are
    unquantized (packed tensors have other names and shapes).
    """
    prefix, interleaved, biases = _fused_layout(spec)
    each = f"{prefix}.*"
    gate_up = [Transpose(1, 2), Chunk(dim=1), SplitModulelist(dim=0)]
    gate_up_bias = [Chunk(dim=1), SplitModulelist(dim=0)]
    if interleaved:
        gate_up.insert(0, Interleave(dim=2))
        gate_up_bias.insert(0, Interleave(dim=1))
    # `$` keeps `gate_up_proj` from also matching `gate_up_proj_bias`
    conversions = [
        WeightConverter(
            f"{prefix}.gate_up_proj$",
            [f"{each}.gate_proj.weight", f"{each}.up_proj.weight"],
            gate_up,
        ),
        WeightConverter(
            f"{prefix}.down_proj$",
            f"{each}.down_proj.weight",
            [Transpose(1, 2), SplitModulelist(dim=0)],
        ),
    ]
    if biases:
        conversions += [
            WeightConverter(
                f"{prefix}.gate_up_proj_bias$",
                [f"{each}.gate_proj.bias", f"{each}.up_proj.bias"],
                gate_up_bias,
            ),
            WeightConverter(
                f"{prefix}.down_proj_bias$",
                f"{each}.down_proj.bias",
                [SplitModulelist(dim=0)],
            ),
        ]
    return conversions


def fused_save_conversions_outside_scope(
    prefixes: list[str], block: str = "mlp", experts: str = "experts"
) -> list[WeightTransform]:
    """
    For ``model._weight_conversions`` of a quantized model whose checkpoint holds
    MoE blocks outside the row's ``moe_scope`` (Qwen3-Omni's talker): written in
    the load direction (transformers' fused ``gate_up_proj [E, 2I, H]``, gate
    rows first, and ``down_proj [E, H, I]`` -> per-expert), each scoped to one
    top-level module, so that a save writes those blocks' unquantized experts
    fused. transformers reloads the unquantized experts of a quantized
    checkpoint only so: it rewrites every per-expert converter to read packed
    weights.

    :param prefixes: top-level module names holding those blocks (``talker``)
    """
    each = f"{block}.{experts}.*"
    conversions: list[WeightTransform] = []
    for prefix in prefixes:
        scoped = [
            WeightConverter(
                f"{block}.{experts}.gate_up_proj$",
                [f"{each}.gate_proj.weight", f"{each}.up_proj.weight"],
                [Chunk(dim=1), SplitModulelist(dim=0)],
            ),
            WeightConverter(
                f"{block}.{experts}.down_proj$",
                f"{each}.down_proj.weight",
                [SplitModulelist(dim=0)],
            ),
        ]
        for transform in scoped:
            transform.scope_prefix = prefix
            transform.base_model_prefix = ""
        conversions += scoped
    return conversions


def hub_save_conversions(
    model_type: str, spec: MoEArchSpec, linearized: bool
) -> list[WeightTransform]:
    """
    For ``model._weight_conversions`` (written in the load direction; a save
    applies the reverse): the row's ``linear_save_renames`` and, for a row with
    ``keep_load_converters``, transformers' own converters for ``model_type``.

    :param model_type: the loaded model's ``config.model_type`` (a wrapper's for
        a vision-language model), which transformers keys its mapping by
    :param spec: the family's row
    :param linearized: whether the experts are per-expert modules; the
        converters into the fused experts are kept only for a fused model (the
        tiny models' hub layout)
    """
    converters: list[WeightTransform] = []
    if spec.keep_load_converters:
        fused = re.compile(
            rf"{re.escape(spec.experts_attr)}\W*\.?(gate_up_proj|down_proj)"
        )
        converters = [
            transform
            for transform in get_checkpoint_conversion_mapping(model_type) or []
            if isinstance(transform, WeightConverter)
            and not (
                linearized
                and any(fused.search(target) for target in transform.target_patterns)
            )
        ]
    # renames first: compressed-tensors maps the quantization ignore list
    # through the reversed list in order, so a converted module's name (the
    # vision attn.q_proj -> wqkv) must be converted before it is renamed
    return [
        WeightRenaming(disk, memory) for disk, memory in spec.linear_save_renames
    ] + converters


@contextlib.contextmanager
def per_expert_checkpoints(
    model_type: str = "gpt_oss", num_experts: int | None = None
) -> Iterator[None]:
    """
    Within the block, transformers loads ``model_type`` checkpoints whose experts
    are stored per expert into the fused experts class: for families with
    ``per_expert_load``, unquantized or as compressed-tensors packs them; for
    gpt-oss, quantized as written here (``mlp.experts.{i}.w13_weight_packed``,
    the names vLLM reads; :mod:`ream_modifiers.moe.packed_names`) or as
    llm-compressor writes it (``mlp.experts.{i}.gate_proj.weight_packed``), or
    unquantized per expert.
    The previous mapping is restored on exit: registered for good, it would also
    make transformers save fused gpt-oss models per expert.

    :param model_type: the family (only those whose hub layout is fused, gpt-oss,
        those with ``per_expert_load``, Granite-MoE and Qwen3-VL-MoE, and those
        with ``expert_sets`` need this)
    :param num_experts: the checkpoint's count per expert set (ERNIE-4.5-VL):
        transformers stacks a layer's whole list before splitting it into the
        sets, which fails for quantized experts of two widths, so each set gets
        its own converter (``text_config`` count; not needed for other families)
    """
    from ream_modifiers.moe.architectures import ARCHITECTURES
    from ream_modifiers.moe.packed_names import packed_names_load_conversions

    spec = ARCHITECTURES.get(model_type)
    sets = spec is not None and bool(spec.expert_sets) and num_experts is not None
    if spec is None or not (spec.fused_on_disk or spec.per_expert_load or sets):
        yield
        return

    previous = get_checkpoint_conversion_mapping(model_type)
    if sets:
        conversions = [
            transform
            for transform in previous or []
            if not any(".experts." in target for target in transform.target_patterns)
        ] + _expert_set_converters(spec, num_experts)
    elif spec.fused_on_disk:
        conversions = per_expert_load_conversions(spec) + packed_names_load_conversions(
            spec
        )
    else:
        # the family's own renames still apply to the other tensors
        conversions = list(previous or []) + _per_expert_converters(
            spec.hub_block_attr or "mlp", spec.experts_attr
        )
    register_checkpoint_conversion_mapping(model_type, conversions, overwrite=True)
    try:
        yield
    finally:
        register_checkpoint_conversion_mapping(model_type, previous, overwrite=True)


def register_loaded_as_mappings() -> None:
    """
    Give every model type of ``LOADED_AS`` (Kimi-K2) its native family's
    conversion mapping (idempotent), so its per-expert tensors are fused into the
    experts on load.
    """
    from ream_modifiers.moe.architectures import LOADED_AS

    for model_type, native in LOADED_AS.items():
        if get_checkpoint_conversion_mapping(model_type) is not None:
            continue
        mapping = get_checkpoint_conversion_mapping(native)
        if mapping is None:  # pragma: no cover - transformers without the mapping
            logger.warning(f"transformers has no {native} conversion mapping to reuse")
            continue
        register_checkpoint_conversion_mapping(model_type, mapping)


def _expert_set_converters(
    spec: MoEArchSpec, num_experts: int
) -> list[WeightTransform]:
    """One layer's hub list ``<block>.experts.{0..S*E-1}`` -> each set's fused
    experts in transformers' layout, set ``k`` from indices ``k*E .. k*E+E-1``."""
    block = spec.hub_block_attr or "mlp"
    converters: list[WeightTransform] = []
    for offset, name in enumerate(spec.expert_sets):
        indices = "|".join(
            str(i) for i in range(offset * num_experts, (offset + 1) * num_experts)
        )
        converters += _stacking_converters(
            rf"{block}\.{spec.experts_attr}\.(?:{indices})",
            f"{block}.{name}.{spec.experts_attr}",
        )
    return converters


def _per_expert_converters(block: str, experts: str) -> list[WeightTransform]:
    """Per-expert ``nn.Linear`` tensors -> fused ``gate_up_proj`` [E, 2I, H] (gate
    rows first) and ``down_proj`` [E, H, I], transformers' default layout."""
    return _stacking_converters(f"{block}.{experts}.*", f"{block}.{experts}")


def _stacking_converters(each: str, fused: str) -> list[WeightTransform]:
    """The experts matched by ``each`` (a pattern up to the expert index)
    stacked into ``<fused>.gate_up_proj`` and ``<fused>.down_proj``."""
    return [
        WeightConverter(
            [f"{each}.gate_proj.weight", f"{each}.up_proj.weight"],
            f"{fused}.gate_up_proj",
            [MergeModulelist(dim=0), Concatenate(dim=1)],
        ),
        WeightConverter(
            f"{each}.down_proj.weight",
            f"{fused}.down_proj",
            [MergeModulelist(dim=0)],
        ),
    ]
