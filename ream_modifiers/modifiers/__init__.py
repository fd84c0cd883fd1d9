from .aimer import AIMERModifier
from .base import ExpertReductionModifier, LayerDecision
from .reap import REAPModifier

__all__ = ["AIMERModifier", "ExpertReductionModifier", "LayerDecision", "REAPModifier"]
