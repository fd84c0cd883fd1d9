from .base import MoEITSModifier

__all__ = ["MoEITSModifier"]
