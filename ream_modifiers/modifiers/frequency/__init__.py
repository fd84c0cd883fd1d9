"""The FrequencyPruningModifier method: its modifier and its registry entry."""

from ream_modifiers.registry import register_method

from .modifier import FrequencyPruningModifier

__all__ = ["FrequencyPruningModifier"]

register_method(
    FrequencyPruningModifier,
    "frequency",
    "prune the least routed experts",
    baseline=True,
)
