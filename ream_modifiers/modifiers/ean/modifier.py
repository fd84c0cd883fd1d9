"""EAN pruning: remove the experts with the smallest summed output norms."""

from __future__ import annotations

from typing import ClassVar, Literal

from ream_modifiers.modifiers.reap.modifier import REAPModifier

__all__ = ["EANPruningModifier"]


class EANPruningModifier(REAPModifier):
    """
    EAN pruning (Jaiswal et al., 2025, "Finding Fantastic Experts in MoEs"), as
    the REAP paper runs it:
    remove the experts with the smallest sum over routed tokens of ||f_j(x)||_2
    (``saliency: ean``, the paper's form; ``ean_mean`` averages per token).

    Example recipe::

        prune_stage:
          prune_modifiers:
            EANPruningModifier: {sparsity: 0.25}
    """

    method: ClassVar[str] = "EAN"
    saliency: Literal["ean", "ean_mean"] = "ean"
