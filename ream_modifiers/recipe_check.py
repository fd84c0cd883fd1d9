"""
Refuse, before the model is loaded, a recipe that llm-compressor would run as
less than it says.

llm-compressor's ``Recipe.from_dict`` reads only top-level keys ending in
``_stage`` and, inside them, group keys ending in ``_modifiers``; anything else
is skipped without a word, errors inside it included. A recipe with ``stage:``
instead of ``prune_stage:`` therefore parses to zero modifiers, and a compress
run would calibrate, "pass" and publish an uncompressed copy.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from ream_modifiers.errors import InputError

__all__ = ["RecipeError", "ignored_keys", "load_checked_recipe"]

# top-level keys llm-compressor reads without the suffix rule
_RECIPE_LEVEL_KEYS = frozenset({"args", "version", "metadata"})
# one line, as the CLI prints it after ``fix:`` (YAML flow style)
_NAMING_RULE = (
    "name each stage `<name>_stage` and each modifier group inside it "
    "`<name>_modifiers`, e.g. "
    "{reap_stage: {reap_modifiers: {REAPModifier: {sparsity: 0.25}}}}"
)


class RecipeError(InputError):
    """A recipe that cannot run as written: what is wrong and how to fix it."""


def ignored_keys(recipe: dict[str, Any]) -> list[str]:
    """Keys of a parsed recipe that llm-compressor skips (dotted, in order)."""
    ignored = []
    for key, value in recipe.items():
        if key in _RECIPE_LEVEL_KEYS:
            continue
        if not (str(key).endswith("_stage") and isinstance(value, dict)):
            ignored.append(str(key))
            continue
        for group, modifiers in value.items():
            if not (str(group).endswith("_modifiers") and isinstance(modifiers, dict)):
                ignored.append(f"{key}.{group}")
    return ignored


def _reduction_names() -> list[str]:
    from ream_modifiers.modifiers.base import ExpertReductionModifier

    found, stack = set(), [ExpertReductionModifier]
    while stack:
        for subclass in stack.pop().__subclasses__():
            stack.append(subclass)
            if not subclass.__name__.startswith("_"):
                found.add(subclass.__name__)
    return sorted(found - {"ExpertMergingModifier"})


def _class_error(path: Path, name: str) -> RecipeError:
    from llmcompressor.modifiers.factory import ModifierFactory

    known = sorted(
        {*ModifierFactory._main_registry, *ModifierFactory._registered_registry}
    )
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    return RecipeError(
        f"recipe {path}: no modifier class named {name!r}",
        f"{hint}expert reduction: {', '.join(_reduction_names())}; quantization: "
        "GPTQModifier, QuantizationModifier",
    )


def _field_error(path: Path, error: ValidationError) -> RecipeError:
    first = error.errors()[0]
    field = ".".join(str(part) for part in first["loc"])
    model = error.title
    if not field:
        # a check across fields (both num_experts and sparsity, a range): its
        # own message names the modifier and the values
        cause = first.get("ctx", {}).get("error")
        message = str(cause) if cause is not None else first["msg"]
        if not message.startswith(model):
            message = f"{model}: {message}"
        return RecipeError(
            f"recipe {path}: {message}",
            f"correct the {model} settings; help(ream_modifiers.{model}) lists "
            "the fields",
        )
    problem = f"recipe {path}: {model}.{field}: {first['msg']}"
    fix = f"correct {model}.{field}; help(ream_modifiers.{model}) lists the fields"
    if first["type"] == "extra_forbidden":
        from llmcompressor.modifiers.factory import ModifierFactory

        registry = {
            **ModifierFactory._main_registry,
            **ModifierFactory._registered_registry,
        }
        fields = list(getattr(registry.get(model), "model_fields", {}))
        close = difflib.get_close_matches(str(first["loc"][0]), fields, n=1)
        if close:
            fix = f"did you mean {close[0]}? {fix}"
    return RecipeError(problem, fix)


def load_checked_recipe(path: str | os.PathLike, require_reduction: bool = True):
    """
    The llm-compressor ``Recipe`` of ``path``, refused when it is not what its
    text says.

    :param path: a YAML recipe file
    :param require_reduction: also refuse a recipe without an expert-reduction
        modifier (``compress``'s case)
    :raises RecipeError: broken YAML, keys llm-compressor would skip, an
        unknown modifier class or field or a bad value, no modifier at all, or
        (with ``require_reduction``) no expert reduction
    """
    from llmcompressor.recipe import Recipe

    from ream_modifiers.modifiers.base import ExpertReductionModifier

    path = Path(path)
    try:
        parsed = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        problem = getattr(error, "problem", None) or error
        raise RecipeError(
            f"recipe {path} is not valid YAML{line}: {problem}",
            "fix the YAML syntax (indentation with spaces, `key: value` pairs)",
        ) from None
    if not isinstance(parsed, dict):
        raise RecipeError(
            f"recipe {path} is a YAML {type(parsed).__name__}, not a mapping of stages",
            _NAMING_RULE,
        )
    ignored = ignored_keys(parsed)
    if ignored:
        raise RecipeError(
            f"recipe {path}: llm-compressor would skip {', '.join(ignored)} "
            "without running anything in it",
            _NAMING_RULE,
        )
    try:
        recipe = Recipe.create_instance(str(path))
    except ValidationError as error:
        raise _field_error(path, error) from None
    except ValueError as error:
        missing = re.search(r"No modifier of type '([^']+)'", str(error))
        if missing is None:
            raise
        raise _class_error(path, missing.group(1)) from None
    if not recipe.modifiers:
        raise RecipeError(f"recipe {path} has no modifier", _NAMING_RULE)
    if require_reduction and not any(
        isinstance(m, ExpertReductionModifier) for m in recipe.modifiers
    ):
        have = ", ".join(type(m).__name__ for m in recipe.modifiers)
        raise RecipeError(
            f"recipe {path} reduces no experts (it has {have})",
            f"add one of {', '.join(_reduction_names())} to a stage",
        )
    return recipe
