from .base import AIMERModifier

__all__ = ["AIMERModifier"]
