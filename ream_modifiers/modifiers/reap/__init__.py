from .base import REAPModifier

__all__ = ["REAPModifier"]
