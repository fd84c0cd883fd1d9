"""The MSMoEModifier method: its modifier and its registry entry."""

from ream_modifiers.registry import register_method

from .modifier import MSMoEModifier

__all__ = ["MSMoEModifier"]

register_method(
    MSMoEModifier,
    "msmoe",
    "frequency-dominant experts, weight matching",
    fast_settings={"max_activation_tokens": 256},
    baseline=True,
)
