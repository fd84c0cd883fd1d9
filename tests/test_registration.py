import pytest
import yaml
from llmcompressor.modifiers.factory import ModifierFactory
from llmcompressor.recipe import Recipe

import ream_modifiers
from ream_modifiers import AIMERModifier, REAPModifier
from ream_modifiers.registry import get_method, methods, register_method


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


def test_cli_help_lists_every_registered_method_and_recipe():
    from ream_modifiers.cli.parser import methods_help

    text = methods_help()
    for method in methods():
        assert f"  {method.class_name} " in text, method.name
        if method.recipe is not None:
            assert method.recipe in text
    assert "HCSMoEModifier            HC-SMoE baseline: " in text


def test_registry_entries():
    """Nine methods; every recipe exists and names its method's modifier."""
    from ream_modifiers.resources import resolve_recipe

    assert [m.name for m in methods()] == [
        "reap", "aimer", "ream", "dern", "moeits",
        "hcsmoe", "msmoe", "frequency", "ean",
    ]  # fmt: skip
    assert {m.kind for m in methods()} == {"prune", "merge", "recombine"}
    assert get_method("DERNModifier") is get_method("dern")
    assert [m.name for m in methods() if not m.needs_data] == ["aimer", "moeits"]
    for method in methods(baselines=False):
        recipe = yaml.safe_load(resolve_recipe(method.recipe).read_text())
        stage = next(iter(recipe.values()))
        assert method.class_name in next(iter(stage.values()))
    with pytest.raises(KeyError, match="unknown method 'nope'; registered"):
        get_method("nope")


def test_register_method_refuses_a_clashing_name():
    class Other(REAPModifier):
        method = "Other"

    with pytest.raises(ValueError, match="clashes with 'reap'"):
        register_method(Other, "reap", "")
    assert get_method("reap").modifier is REAPModifier
