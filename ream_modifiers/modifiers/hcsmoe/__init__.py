"""The HCSMoEModifier method: its modifier and its registry entry."""

from ream_modifiers.registry import register_method

from .modifier import HCSMoEModifier

__all__ = ["HCSMoEModifier"]

register_method(
    HCSMoEModifier,
    "hcsmoe",
    "cluster mean outputs, average",
    fast_settings={"max_activation_tokens": 256},
    baseline=True,
)
