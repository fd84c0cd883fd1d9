"""
``compress --from-stats / --save-stats / --budget``: the recipe's expert
reduction modifiers, with those settings added.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import yaml

from ream_modifiers.cli.args import StatisticsArguments
from ream_modifiers.errors import InputError

__all__ = ["recipe_with_statistics"]


def recipe_with_statistics(recipe_path: Path, args: StatisticsArguments) -> Path:
    """
    ``recipe_path``, or a copy of it (in a temporary directory) whose expert
    reduction modifiers carry ``from_statistics``, ``save_statistics`` and
    ``budget`` from ``args``; the output's ``recipe.yaml`` then says so.

    :raises InputError: if the options cannot work together or the recipe has
        no expert reduction to apply them to
    """
    settings = _settings(args)
    if not settings:
        return recipe_path
    import ream_modifiers.modifiers  # noqa: F401  (each method folder registers)
    from ream_modifiers.registry import methods

    names = {method.class_name for method in methods()}
    recipe = yaml.safe_load(recipe_path.read_text())
    found = _update_modifiers(recipe, names, settings)
    if not found:
        raise InputError(
            f"recipe {recipe_path} has no expert reduction modifier for "
            f"{sorted(settings)}",
            f"use a recipe with one of {sorted(names)}",
        )
    if len(found) > 1 and "save_statistics" in settings:
        raise InputError(
            f"--save-stats: recipe {recipe_path} has {len(found)} expert reductions "
            f"({found}), and each would save to the same directory",
            "save from a recipe with one reduction, or set save_statistics per "
            "modifier in the recipe",
        )
    patched = Path(tempfile.mkdtemp(prefix="ream-recipe-")) / recipe_path.name
    patched.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return patched


def _settings(args: StatisticsArguments) -> dict[str, Any]:
    if args.from_stats is not None and args.save_stats is not None:
        raise InputError(
            "give at most one of --from-stats and --save-stats",
            "--from-stats reads statistics saved earlier; --save-stats records a "
            "new run's",
        )
    if args.budget != "uniform" and args.from_stats is None:
        raise InputError(
            f"--budget {args.budget} needs every layer's statistics before the "
            "first layer is reduced",
            "calibrate once (ream-compress calibrate --output STATS ...) and add "
            "--from-stats STATS",
        )
    if args.pad and args.budget == "uniform":
        raise InputError(
            "--pad pads a non-uniform budget's layers to one count; with a "
            "uniform budget there is nothing to pad",
            "add --budget saliency_mass (with --from-stats), or drop --pad",
        )
    if args.from_stats is not None:
        from ream_modifiers.observe.stats_file import StatisticsFile

        try:
            StatisticsFile(args.from_stats)
        except ValueError as error:
            raise InputError(
                str(error), "pass a finished statistics directory"
            ) from None
    settings: dict[str, Any] = {}
    if args.from_stats is not None:
        settings["from_statistics"] = str(Path(args.from_stats).resolve())
    if args.save_stats is not None:
        target = Path(args.save_stats)
        if target.exists():
            raise InputError(
                f"--save-stats {target} already exists",
                "choose a new directory (statistics are never overwritten)",
            )
        settings["save_statistics"] = str(target.resolve())
    if args.budget != "uniform":
        settings["budget"] = args.budget
    return settings


def _update_modifiers(node: Any, names: set[str], settings: dict) -> list[str]:
    """Add ``settings`` to every modifier entry named in ``names``, in place."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in names and isinstance(value, dict):
                value.update(settings)
                found.append(key)
            else:
                found += _update_modifiers(value, names, settings)
    return found
