"""The AIMERModifier method: its modifier and its registry entry."""

from ream_modifiers.registry import register_method

from .modifier import AIMERModifier

__all__ = ["AIMERModifier"]

register_method(
    AIMERModifier, "aimer", "data-free, prune by mean|w| / RMS(w)", recipe="aimer_w4a16"
)
