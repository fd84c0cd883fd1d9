from .base import DERNModifier

__all__ = ["DERNModifier"]
