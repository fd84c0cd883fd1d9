"""
Recipes that llm-compressor would run as less than they say are refused before
the model is loaded: exit 2, ``error:`` and ``fix:`` lines, nothing written.
"""

from __future__ import annotations

import pytest

from ream_modifiers.recipe_check import RecipeError, load_checked_recipe
from tests.helpers import refused

REAP = "REAPModifier:\n      sparsity: 0.25\n"
GPTQ = "GPTQModifier:\n      targets: [Linear]\n      scheme: W4A16\n"
BAD_RECIPES = {
    # (recipe text, what the error line must name)
    "stage key without _stage": (
        f"stage:\n  reap_modifiers:\n    {REAP}",
        "would skip stage without",
    ),
    "group key without _modifiers": (
        f"reap_stage:\n  reap:\n    {REAP}",
        "would skip reap_stage.reap without",
    ),
    "modifiers at the top level": (
        "REAPModifier:\n  sparsity: 0.25\n",
        "would skip REAPModifier without",
    ),
    "a second stage misnamed": (
        f"reap_stage:\n  reap_modifiers:\n    {REAP}quant:\n  q_modifiers:\n    {GPTQ}",
        "would skip quant without",
    ),
    "quantization only": (
        f"quant_stage:\n  quant_modifiers:\n    {GPTQ}",
        "reduces no experts (it has GPTQModifier)",
    ),
    "empty stage": ("reap_stage: {}\n", "has no modifier"),
    "broken YAML": (
        "reap_stage:\n  reap_modifiers:\n\tREAPModifier: {}\n",
        "not valid YAML",
    ),
    "a list, not stages": ("- REAPModifier\n", "is a YAML list, not a mapping"),
    "misspelled class": (
        "reap_stage:\n  reap_modifiers:\n    REAPModifer:\n      sparsity: 0.25\n",
        "no modifier class named 'REAPModifer'",
    ),
    "misspelled field": (
        "reap_stage:\n  reap_modifiers:\n    REAPModifier:\n      sparsty: 0.25\n",
        "REAPModifier.sparsty: Extra inputs are not permitted",
    ),
    "bad quantization scheme": (
        f"reap_stage:\n  reap_modifiers:\n    {REAP}    GPTQModifier:\n"
        "      targets: [Linear]\n      scheme: W4A17\n",
        "GPTQModifier.scheme: Value error",
    ),
}
# the fix line for these names the likely intended spelling
SUGGESTIONS = {
    "misspelled class": "did you mean REAPModifier?",
    "misspelled field": "did you mean sparsity?",
}


@pytest.mark.parametrize("case", sorted(BAD_RECIPES))
def test_bad_recipe_is_refused_before_the_model_loads(tmp_path, capsys, case):
    text, named = BAD_RECIPES[case]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    out = tmp_path / "out"
    # a model path that does not exist: the recipe error must come first
    argv = ["compress", str(recipe), "--model", str(tmp_path / "no-model"),
            "--dataset", "bundled", "--output", str(out)]  # fmt: skip
    refusal = refused(capsys, argv)
    assert refusal.error.startswith("recipe ") and named in refusal.error
    assert SUGGESTIONS.get(case, "") in refusal.fix
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]


def test_the_shipped_recipes_pass(tmp_path):
    from ream_modifiers.cli import REPO_RECIPES

    for path in sorted(REPO_RECIPES.glob("*.yaml")):
        assert load_checked_recipe(path).modifiers, path


def test_quantization_only_is_fine_where_no_reduction_is_required(tmp_path):
    recipe = tmp_path / "q.yaml"
    recipe.write_text(BAD_RECIPES["quantization only"][0])
    with pytest.raises(RecipeError, match="reduces no experts"):
        load_checked_recipe(recipe)
    assert load_checked_recipe(recipe, require_reduction=False).modifiers
