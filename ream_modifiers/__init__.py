"""
ream-modifiers: expert pruning and merging for MoE LLMs as llm-compressor
modifiers. Importing the package registers every modifier with llm-compressor's
``ModifierFactory`` so that YAML recipes resolve the class names, and makes
llm-compressor's sequential pipeline calibrate with causal attention masks (see
:mod:`ream_modifiers.causal_calibration`).
"""

from llmcompressor.modifiers.factory import ModifierFactory

from ream_modifiers import causal_calibration as _causal_calibration
from ream_modifiers.modifiers import (
    AIMERModifier,
    DERNModifier,
    EANPruningModifier,
    ExpertMergingModifier,
    ExpertReductionModifier,
    FrequencyPruningModifier,
    HCSMoEModifier,
    MoEITSModifier,
    MSMoEModifier,
    REAMModifier,
    REAPModifier,
)
from ream_modifiers.moe import find_moe_layers, load_moe_model

__version__ = "0.1.0"

MODIFIERS = (
    REAPModifier,
    AIMERModifier,
    REAMModifier,
    HCSMoEModifier,
    MSMoEModifier,
    FrequencyPruningModifier,
    EANPruningModifier,
    DERNModifier,
    MoEITSModifier,
)

__all__ = [
    "MODIFIERS",
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
    "find_moe_layers",
    "load_moe_model",
    "register",
]


def register() -> None:
    """Register every modifier of this package with llm-compressor (idempotent)."""
    for cls in MODIFIERS:
        if ModifierFactory._registered_registry.get(cls.__name__) is not cls:
            ModifierFactory.register(cls.__name__, cls)


register()
_causal_calibration.install()
