"""
Checkpoints whose MoE layers keep different numbers of experts (a non-uniform
``budget``), and how transformers and vLLM build them.

Neither library can express such a model: each builds every MoE layer from the
one expert count in the config. The saved ``config.json`` therefore keeps that
count at the largest layer's (so a loader that ignores the rest fails loudly on
the smaller layers' shapes, rather than serving uninitialised experts) and adds
:data:`PER_LAYER_KEY`, one entry per decoder layer (``null`` where the layer
has no routed experts). Both builders then construct each decoder layer while
the config's count reads that layer's own:

- transformers: :func:`ream_modifiers.moe.load_moe_model`;
- vLLM: the ``vllm.general_plugins`` entry point of this package
  (:mod:`ream_modifiers.vllm_plugin`), active once ream-modifiers is installed
  in vLLM's environment.

:data:`PER_LAYER_FAMILIES` lists the families whose decoder layer and count key
are known to both. This module imports neither torch nor either library, so
the vLLM plugin can read it.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

__all__ = [
    "PER_LAYER_FAMILIES",
    "PER_LAYER_KEY",
    "PerLayerFamily",
    "building_per_layer",
    "counting_init",
    "decoder_index",
    "mismatched_counts",
    "per_layer_counts",
    "per_layer_entry",
    "per_layer_family",
    "resolve_class",
]

PER_LAYER_KEY = "num_experts_per_layer"


@dataclass(frozen=True)
class PerLayerFamily:
    """
    Where a family's per-layer count is read while its decoder layers are built.

    :param count_attr: the config attribute the MoE block reads its count from
    :param transformers_layer: ``module:Class`` of transformers' decoder layer,
        built as ``Class(config, layer_idx)``
    :param vllm_layer: ``module:Class`` of vLLM's decoder layer, built with
        ``prefix="...layers.<i>"``
    """

    count_attr: str
    transformers_layer: str
    vllm_layer: str


# Mixtral is not here yet: transformers loads its experts fused, and
# llm-compressor's linearization then sizes every layer from the config's count
PER_LAYER_FAMILIES: dict[str, PerLayerFamily] = {
    "qwen3_moe": PerLayerFamily(
        count_attr="num_experts",
        transformers_layer=(
            "transformers.models.qwen3_moe.modeling_qwen3_moe:Qwen3MoeDecoderLayer"
        ),
        vllm_layer="vllm.model_executor.models.qwen3_moe:Qwen3MoeDecoderLayer",
    ),
}

_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")


def per_layer_family(model_type: str | None) -> PerLayerFamily | None:
    """The family's per-layer build facts, or None where none is known."""
    return PER_LAYER_FAMILIES.get(model_type or "")


def decoder_index(name: str) -> int | None:
    """The decoder layer index in a module name or prefix (``model.layers.3``)."""
    found = _LAYER_INDEX.search(name)
    return None if found is None else int(found.group(1))


def per_layer_counts(config: Any) -> list[int | None] | None:
    """The per-decoder-layer expert counts of a config (object or dict), if any."""
    if isinstance(config, dict):
        return config.get(PER_LAYER_KEY)
    return getattr(config, PER_LAYER_KEY, None)


def per_layer_entry(
    layers: Sequence[tuple[str, int]], num_hidden_layers: int
) -> list[int | None]:
    """:data:`PER_LAYER_KEY`'s value for MoE ``layers`` given as (name, count)."""
    counts: list[int | None] = [None] * num_hidden_layers
    for name, count in layers:
        index = decoder_index(name)
        if index is None or index >= num_hidden_layers:
            raise ValueError(
                f"MoE layer {name} is not a decoder layer (layers.<i> below "
                f"{num_hidden_layers}); a per-layer expert count cannot name it"
            )
        counts[index] = count
    return counts


def resolve_class(path: str) -> type:
    """The class named ``module:Class``."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def counting_init(
    original: Callable,
    count_attr: str,
    config_of: Callable[[tuple, dict], Any],
    index_of: Callable[[tuple, dict], int | None],
) -> Callable:
    """
    A decoder layer ``__init__`` that runs ``original`` while the layer's config
    reads its own :data:`PER_LAYER_KEY` count as ``count_attr`` (restored right
    after); configs without the key are left alone.

    :param config_of: the config the layer reads, from ``(args, kwargs)``
    :param index_of: the layer index, from ``(args, kwargs)``
    """

    def build(self, *args, **kwargs):
        config = config_of(args, kwargs)
        counts = per_layer_counts(config)
        index = None if counts is None else index_of(args, kwargs)
        count = None if index is None or index >= len(counts) else counts[index]
        if count is None:
            return original(self, *args, **kwargs)
        largest = getattr(config, count_attr)
        setattr(config, count_attr, count)
        try:
            return original(self, *args, **kwargs)
        finally:
            setattr(config, count_attr, largest)

    build.builds_per_layer = True
    return build


@contextmanager
def building_per_layer(layer_class: str, count_attr: str) -> Iterator[None]:
    """
    While active, every ``layer_class`` built as transformers builds decoder
    layers, ``Class(config, layer_idx)``, gets its own layer's count
    (:func:`counting_init`) from the config it is given (``from_pretrained``
    builds from its own copy of the config).
    """
    cls = resolve_class(layer_class)
    original = cls.__init__
    cls.__init__ = counting_init(
        original, count_attr, _transformers_argument(0, "config"),
        _transformers_argument(1, "layer_idx"),
    )  # fmt: skip
    try:
        yield
    finally:
        cls.__init__ = original


def mismatched_counts(
    layers: Sequence[tuple[str, int]], declared: Sequence[int | None]
) -> dict[str, tuple[int, int | None]]:
    """The MoE layers (name, stored count) whose count is not the one
    ``declared`` (:data:`PER_LAYER_KEY`) lists for their decoder layer, as
    ``{name: (stored, listed)}``."""
    wrong = {}
    for name, count in layers:
        index = decoder_index(name)
        listed = None if index is None or index >= len(declared) else declared[index]
        if listed != count:
            wrong[name] = (count, listed)
    return wrong


def _transformers_argument(position: int, name: str) -> Callable[[tuple, dict], Any]:
    def read(args: tuple, kwargs: dict) -> Any:
        return kwargs.get(name, args[position] if len(args) > position else None)

    return read
