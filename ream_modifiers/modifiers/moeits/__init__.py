"""The MoEITSModifier method: its modifier and its registry entry."""

from ream_modifiers.registry import register_method

from .modifier import MoEITSModifier

__all__ = ["MoEITSModifier"]

register_method(
    MoEITSModifier,
    "moeits",
    "data-free, prune redundant experts (weight NMI)",
    recipe="moeits_w4a16",
    fast_settings={"bins": 16},
)
