"""Frequency pruning: remove the experts routed to least often."""

from __future__ import annotations

from typing import ClassVar, Literal

from ream_modifiers.modifiers.reap.modifier import REAPModifier

__all__ = ["FrequencyPruningModifier"]


class FrequencyPruningModifier(REAPModifier):
    """
    Frequency pruning: remove the experts routed to least often, S_j = |X_j|.

    Example recipe::

        prune_stage:
          prune_modifiers:
            FrequencyPruningModifier: {sparsity: 0.25}
    """

    method: ClassVar[str] = "Frequency"
    saliency: Literal["frequency"] = "frequency"
