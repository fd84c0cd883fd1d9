"""
Calibrate once: record what every method needs, reduce nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import Field, PrivateAttr, model_validator

from ream_modifiers.modifiers.base import ExpertReductionModifier, LayerDecision
from ream_modifiers.moe.layer import MoELayer
from ream_modifiers.observe.statistics import LayerStatistics, Statistic
from ream_modifiers.registry import get_method, methods

__all__ = ["ExpertStatisticsModifier", "StatisticsUnion"]


@dataclass
class StatisticsUnion(LayerStatistics):
    """Several methods' statistics, each kept once (a superset stands in for
    the statistics it covers)."""

    members: list[Statistic] = field(default_factory=list)

    def collected(self) -> list[Statistic]:
        return list(self.members)

    def add(self, statistic: Statistic) -> None:
        for position, held in enumerate(self.members):
            if statistic.accepts(held.name, held.settings()):
                return  # already covered
            if held.accepts(statistic.name, statistic.settings()):
                self.members[position] = statistic  # the new one covers it
                return
        self.members.append(statistic)


class ExpertStatisticsModifier(ExpertReductionModifier):
    """
    Records every MoE layer's calibration statistics for a set of methods and
    leaves the model unchanged, so that each method, at any ratio, can then be
    applied with ``from_statistics`` and no forward pass (``ream-compress
    calibrate``, then ``ream-compress compress --from-stats``).

    Because nothing is reduced, every layer is calibrated on the original
    model's hidden states: compressing from these statistics is the "one-shot
    from original" variant. A direct run calibrates layer L after layers < L
    were reduced, so the two agree on the first layer only (BENCHMARKS.md,
    "Calibrate once"). To reproduce a direct run exactly, record its statistics
    with the method's own ``save_statistics``.

    Example recipe::

        calibrate_stage:
          calibrate_modifiers:
            ExpertStatisticsModifier:
              save_statistics: stats/qwen3-30b-a3b
              methods: {REAP: {}, REAM: {max_activation_tokens: 2048}}

    :param methods: method (short name, display name or class name) -> its
        settings; the union of their statistics is recorded. Empty: every
        registered method that calibrates, at its default settings.
    """

    requires_calibration_data: bool = True
    methods: dict[str, dict[str, Any]] = Field(default_factory=dict)

    # the chosen methods' modifiers, built once, whose statistics are recorded
    _members: list[ExpertReductionModifier] = PrivateAttr(default_factory=list)

    method: ClassVar[str] = "statistics"
    statistics_mode: ClassVar[str] = "original"

    def uniform_budget(self) -> bool:
        return False  # reduces nothing, so no budget

    @model_validator(mode="after")
    def _validate_statistics_fields(self):
        if self.save_statistics is None:
            raise ValueError(
                "ExpertStatisticsModifier: give save_statistics, the new directory "
                "to write the statistics to"
            )
        chosen = self.methods or {m.name: {} for m in methods() if m.needs_data}
        self._members = []
        for name, settings in chosen.items():  # unknown names, bad settings
            try:
                info = get_method(name)
            except KeyError:
                raise ValueError(
                    f"ExpertStatisticsModifier: unknown method {name!r}; "
                    f"registered: {[m.name for m in methods()]}"
                ) from None
            self._members.append(info.modifier(sparsity=0.5, **settings))
        return self

    def statistics(self, layer: MoELayer) -> StatisticsUnion:
        union = StatisticsUnion()
        for modifier in self._members:
            stats = modifier.statistics(layer)
            for statistic in [] if stats is None else stats.collected():
                union.add(statistic)
        return union

    def decide(self, layer: MoELayer, stats: LayerStatistics | None) -> LayerDecision:
        return LayerDecision(kept=list(range(layer.num_experts)))

    def write(self, layer: MoELayer, decision: LayerDecision, read: Any) -> None:
        """Nothing is reduced."""
