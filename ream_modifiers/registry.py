"""
The registry of expert-reduction methods: one entry per method, written by the
method's own folder (``modifiers/<name>/__init__.py``) with
:func:`register_method`. The CLI help, the model card, the recipe list and the
test matrices read it, so a new method is one folder, one registration and, if
it has one, its recipe.

This module imports nothing heavy: the entries hold the modifier classes, but
reading the registry is plain Python.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from ream_modifiers.modifiers.base import ExpertReductionModifier

__all__ = ["Kind", "MethodInfo", "get_method", "method_for_report", "methods"]

Kind = Literal["prune", "merge", "recombine"]

_METHODS: dict[str, MethodInfo] = {}


@dataclass(frozen=True)
class MethodInfo:
    """
    One registered method. Its display name, paper, kind and whether it needs
    calibration data are the modifier class's own (``method``, ``paper``,
    ``paper_title``, ``kind``, ``requires_calibration_data``).

    :param name: short lower-case name (``reap``), used by tests and benchmarks
    :param modifier: the modifier class that recipes name
    :param summary: one line for ``ream-compress --help``
    :param recipe: the name of its default recipe in ``recipes/``, if any
    :param baseline: a comparison method from the papers rather than a product
    :param fast_settings: settings that keep the method quick on tiny models
        (test matrices and smoke runs), not quality settings
    """

    name: str
    modifier: type[ExpertReductionModifier]
    summary: str
    recipe: str | None = None
    baseline: bool = False
    fast_settings: Mapping[str, Any] = field(default_factory=dict)
    # the class's own facts, copied once
    class_name: str = field(init=False)  # the name recipes use
    label: str = field(init=False)  # display name, as reports write it (REAP)
    paper: str = field(init=False)  # the paper's URL
    paper_title: str = field(init=False)
    kind: Kind = field(init=False)
    needs_data: bool = field(init=False)  # calibrates (else data-free)

    def __post_init__(self) -> None:
        cls = self.modifier
        facts = {
            "class_name": cls.__name__,
            "label": cls.method,
            "paper": cls.paper,
            "paper_title": cls.paper_title,
            "kind": cls.kind,
            "needs_data": bool(cls.model_fields["requires_calibration_data"].default),
        }
        for key, value in facts.items():
            object.__setattr__(self, key, value)  # a frozen dataclass


def register_method(
    modifier: type[ExpertReductionModifier],
    name: str,
    summary: str,
    *,
    recipe: str | None = None,
    baseline: bool = False,
    fast_settings: Mapping[str, Any] | None = None,
) -> MethodInfo:
    """
    Register a method (idempotent for the same class).

    :param modifier: the modifier class; its ``method``, ``paper`` and
        ``paper_title`` class attributes must be set
    :param name: see :class:`MethodInfo`
    :param summary: see :class:`MethodInfo`
    :raises ValueError: if ``name`` or the display name is taken by another class,
        or the class lacks ``method``, ``paper`` or ``paper_title``
    """
    if not (modifier.method and modifier.paper and modifier.paper_title):
        raise ValueError(
            f"{modifier.__name__}: set the `method`, `paper` and `paper_title` "
            "ClassVars"
        )
    info = MethodInfo(
        name, modifier, summary, recipe, baseline, dict(fast_settings or {})
    )
    for other in _METHODS.values():
        if other.modifier is not modifier and (
            other.name == name or other.label == modifier.method
        ):
            raise ValueError(
                f"method {name!r} ({modifier.__name__}) clashes with "
                f"{other.name!r} ({other.class_name})"
            )
    _METHODS[name] = info
    return info


def methods(*, baselines: bool = True) -> list[MethodInfo]:
    """Every registered method, in registration order."""
    return [m for m in _METHODS.values() if baselines or not m.baseline]


def get_method(name: str) -> MethodInfo:
    """
    :param name: the short name (``reap``), the display name (``REAP``, as
        reports write it) or the modifier class name
    :raises KeyError: naming the registered methods
    """
    for info in _METHODS.values():
        if name in (info.name, info.label, info.class_name):
            return info
    raise KeyError(f"unknown method {name!r}; registered: {sorted(_METHODS)}")


def method_for_report(report: dict) -> MethodInfo | None:
    """The method that wrote an ``expert_reduction.json`` entry, if registered."""
    return next((m for m in _METHODS.values() if m.label == report.get("method")), None)
