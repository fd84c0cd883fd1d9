"""
ream-modifiers: expert pruning and merging for MoE LLMs as llm-compressor
modifiers. ``import ream_modifiers`` registers every modifier with
llm-compressor's ``ModifierFactory`` so that YAML recipes resolve the class
names, and makes llm-compressor's sequential pipeline calibrate with causal
attention masks (see :mod:`ream_modifiers.causal_calibration`).

The package itself imports neither torch nor llm-compressor: the registration
runs when llm-compressor is imported (or at once, if it already is; see
:mod:`ream_modifiers._registration`), and the classes below load on first use.
So ``import ream_modifiers.check`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

from ream_modifiers._registration import register, register_when_imported

__version__ = "0.1.0"

# public name -> module that defines it, imported on first access (PEP 562)
_LAZY = {
    **dict.fromkeys(
        (
            "AIMERModifier",
            "DERNModifier",
            "EANPruningModifier",
            "ExpertMergingModifier",
            "ExpertReductionModifier",
            "FrequencyPruningModifier",
            "HCSMoEModifier",
            "MSMoEModifier",
            "MoEITSModifier",
            "REAMModifier",
            "REAPModifier",
        ),
        "ream_modifiers.modifiers",
    ),
    "ExpertStatisticsModifier": "ream_modifiers.modifiers.calibrate",
    "find_moe_layers": "ream_modifiers.moe.layer",
    "load_moe_model": "ream_modifiers.moe.load",
}

__all__ = ["MODIFIERS", *sorted(_LAZY), "register"]


def __getattr__(name: str) -> Any:
    if name == "MODIFIERS":
        # every registered method's modifier (see ream_modifiers.registry)
        importlib.import_module("ream_modifiers.modifiers")
        from ream_modifiers.registry import methods

        return tuple(method.modifier for method in methods())
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ream_modifiers' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


register_when_imported()
