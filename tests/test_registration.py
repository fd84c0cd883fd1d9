import yaml
from llmcompressor.modifiers.factory import ModifierFactory
from llmcompressor.recipe import Recipe

import ream_modifiers
from ream_modifiers import AIMERModifier, REAPModifier


def test_import_registers_every_modifier_idempotently():
    ream_modifiers.register()
    ream_modifiers.register()
    for cls in ream_modifiers.MODIFIERS:
        assert ModifierFactory._registered_registry[cls.__name__] is cls


def test_yaml_recipe_resolves_our_classes_and_round_trips():
    recipe = Recipe.create_instance("""
test_stage:
  test_modifiers:
    REAPModifier: {sparsity: 0.5, preserve_super_experts: true}
    AIMERModifier: {num_experts: 4}
""")
    reap, aimer = recipe.modifiers
    assert isinstance(reap, REAPModifier) and reap.preserve_super_experts
    assert isinstance(aimer, AIMERModifier) and aimer.num_experts == 4
    again = Recipe.create_instance(recipe.yaml())
    assert [type(m) for m in again.modifiers] == [REAPModifier, AIMERModifier]
    assert yaml.safe_load(recipe.yaml())


def test_cli_help_lists_every_modifier():
    from ream_modifiers.cli import METHODS, _methods_help

    assert set(METHODS) == {cls.__name__ for cls in ream_modifiers.MODIFIERS}
    assert "moeits_w4a16" in _methods_help()
