from .base import ExpertMergingModifier, REAMModifier

__all__ = ["ExpertMergingModifier", "REAMModifier"]
