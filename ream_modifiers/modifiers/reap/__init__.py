"""The REAPModifier method: its modifier and its registry entry."""

from ream_modifiers.registry import register_method

from .modifier import REAPModifier

__all__ = ["REAPModifier"]

register_method(
    REAPModifier,
    "reap",
    "prune lowest router-weighted activation saliency",
    recipe="reap_w4a16",
)
