"""
Build step that pyproject.toml cannot declare: the top-level ``recipes/`` (their
one source, kept at the top level) go into the built package as
``ream_modifiers/recipes/``, so a wheel install finds the recipes by name. An
editable install reads ``recipes/`` in place (see ``ream_modifiers.resources``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

RECIPES = Path(__file__).resolve().parent / "recipes"


class BuildWithRecipes(build_py):
    def _recipe_targets(self) -> list[tuple[Path, Path]]:
        target = Path(self.build_lib, "ream_modifiers", "recipes")
        return [(path, target / path.name) for path in sorted(RECIPES.glob("*.yaml"))]

    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return
        target = Path(self.build_lib, "ream_modifiers", "recipes")
        # a reused build folder may hold a recipe since deleted from recipes/
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        for source, destination in self._recipe_targets():
            self.copy_file(str(source), str(destination))

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = super().get_outputs(include_bytecode)
        if self.editable_mode:
            return outputs
        return outputs + [str(destination) for _, destination in self._recipe_targets()]


setup(cmdclass={"build_py": BuildWithRecipes})
