from .base import (
    EANPruningModifier,
    FrequencyPruningModifier,
    HCSMoEModifier,
    MSMoEModifier,
)

__all__ = [
    "EANPruningModifier",
    "FrequencyPruningModifier",
    "HCSMoEModifier",
    "MSMoEModifier",
]
