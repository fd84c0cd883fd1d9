"""
Files the CLI finds by name: the recipes and the demo fixture.

The recipes' one source is the repository's top-level ``recipes/``. A built wheel
carries a copy as package data (``ream_modifiers/recipes/``, copied by
``setup.py``); an editable or source checkout reads ``recipes/`` in place. The
trained demo fixture (``benchmarks/fixture``, 15 MB) is left out of the wheel, so
it exists only in a checkout.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ream_modifiers.errors import InputError

__all__ = [
    "REPO_RECIPES",
    "REPO_ROOT",
    "demo_fixture",
    "recipe_dirs",
    "recipe_names",
    "resolve_recipe",
]

REPO_ROOT = Path(__file__).resolve().parents[1]
REPO_RECIPES = REPO_ROOT / "recipes"
REPO_FIXTURE = REPO_ROOT / "benchmarks" / "fixture"
PACKAGE_RECIPES = "recipes"  # folder of the wheel's copy inside the package


def _in_checkout() -> bool:
    # installed from a wheel, REPO_ROOT is site-packages, where another
    # distribution's top-level recipes/ or benchmarks/ must not be taken for ours
    return (REPO_ROOT / "pyproject.toml").is_file()


def recipe_dirs() -> list[Path]:
    """
    Folders that hold the known recipes, in lookup order: the installed package
    data first, then the checkout's ``recipes/``.
    """
    dirs = []
    packaged = resources.files("ream_modifiers") / PACKAGE_RECIPES
    # a zipped install has no real paths; the CLI needs a file it can read
    if isinstance(packaged, Path) and packaged.is_dir():
        dirs.append(packaged)
    if _in_checkout() and REPO_RECIPES.is_dir():
        dirs.append(REPO_RECIPES)
    return dirs


def recipe_names() -> list[str]:
    """The names (file stems) of the known recipes, sorted."""
    return sorted({path.stem for d in recipe_dirs() for path in d.glob("*.yaml")})


def resolve_recipe(recipe: str | Path) -> Path:
    """
    A recipe file: ``recipe`` itself where it is an existing file, else the known
    recipe of that name, with or without ``.yaml``.

    :param recipe: a recipe file's path, or a known recipe's name (reap_w4a16)
    :raises InputError: for neither
    """
    path = Path(recipe)
    if path.is_file():
        return path
    for folder in recipe_dirs():
        for candidate in (folder / recipe, folder / f"{recipe}.yaml"):
            if candidate.is_file():
                return candidate
    raise InputError(
        f"recipe {str(recipe)!r} not found; known recipes: {recipe_names()}",
        "give a recipe file's path or a known recipe's name",
    )


def demo_fixture() -> Path | None:
    """
    The trained demo fixture's folder (``model/`` and ``data/*_heldout.jsonl``), or
    None where it is not installed (a wheel install).
    """
    if _in_checkout() and (REPO_FIXTURE / "model" / "config.json").is_file():
        return REPO_FIXTURE
    return None
