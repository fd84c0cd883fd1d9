"""The DERNModifier method: its modifier and its registry entry."""

from ream_modifiers.registry import register_method

from .modifier import DERNModifier

__all__ = ["DERNModifier"]

register_method(
    DERNModifier,
    "dern",
    "drop experts, recombine their neurons into kept ones",
    recipe="dern_w4a16",
    fast_settings={"kmeans_iters": 5},
)
