"""The EANPruningModifier method: its modifier and its registry entry."""

from ream_modifiers.registry import register_method

from .modifier import EANPruningModifier

__all__ = ["EANPruningModifier"]

register_method(
    EANPruningModifier,
    "ean",
    "prune the smallest summed output norms",
    baseline=True,
)
