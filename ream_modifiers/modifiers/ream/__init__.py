"""The REAMModifier method: its modifier and its registry entry."""

from ream_modifiers.registry import register_method

from .modifier import REAMModifier

__all__ = ["REAMModifier"]

register_method(
    REAMModifier,
    "ream",
    "merge groups of experts after aligning neurons",
    recipe="ream_w4a16",
    fast_settings={"max_activation_tokens": 256},
)
