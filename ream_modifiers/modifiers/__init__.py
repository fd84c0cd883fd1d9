from .aimer import AIMERModifier
from .base import ExpertReductionModifier, LayerDecision
from .baselines import (
    EANPruningModifier,
    FrequencyPruningModifier,
    HCSMoEModifier,
    MSMoEModifier,
)
from .dern import DERNModifier
from .moeits import MoEITSModifier
from .ream import ExpertMergingModifier, REAMModifier
from .reap import REAPModifier

__all__ = [
    "AIMERModifier",
    "DERNModifier",
    "EANPruningModifier",
    "ExpertMergingModifier",
    "ExpertReductionModifier",
    "FrequencyPruningModifier",
    "HCSMoEModifier",
    "LayerDecision",
    "MSMoEModifier",
    "MoEITSModifier",
    "REAMModifier",
    "REAPModifier",
]
