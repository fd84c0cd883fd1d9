from .aimer import AIMERModifier
from .base import ExpertReductionModifier, LayerDecision
from .baselines import (
    EANPruningModifier,
    FrequencyPruningModifier,
    HCSMoEModifier,
    MSMoEModifier,
)
from .ream import ExpertMergingModifier, REAMModifier
from .reap import REAPModifier

__all__ = [
    "AIMERModifier",
    "EANPruningModifier",
    "ExpertMergingModifier",
    "ExpertReductionModifier",
    "FrequencyPruningModifier",
    "HCSMoEModifier",
    "LayerDecision",
    "MSMoEModifier",
    "REAMModifier",
    "REAPModifier",
]
