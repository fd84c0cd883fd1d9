"""Bad input fails with a message naming the problem and the fix, before calibration."""

import pytest
from llmcompressor import oneshot
from llmcompressor.recipe import Recipe
from pydantic import ValidationError
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from ream_modifiers import AIMERModifier, REAPModifier
from ream_modifiers.moe import MoEModelError


@pytest.mark.parametrize("cls", [REAPModifier, AIMERModifier])
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(sparsity=1.0), "sparsity must be in \\(0, 1\\)"),
        (dict(sparsity=0.0), "sparsity must be in \\(0, 1\\)"),
        (dict(sparsity=0.25, num_experts=6), "exactly one of `num_experts`"),
        (dict(), "exactly one of `num_experts`"),
        (dict(num_experts=0), "num_experts must be >= 1"),
        (dict(sparsity=0.25, report_path="out.txt"), "must end with .json"),
    ],
)
def test_field_errors(cls, kwargs, message):
    with pytest.raises(ValidationError, match=message):
        cls(**kwargs)


def test_misspelled_recipe_field():
    recipe = """
reap_stage:
  reap_modifiers:
    REAPModifier:
      sparsty: 0.25
"""
    with pytest.raises(ValidationError, match="sparsty"):
        Recipe.create_instance(recipe)


@pytest.mark.parametrize(
    "model_type, modifier, message",
    [
        ("qwen3_moe", REAPModifier(num_experts=1), "fewer than the router's top_k=2"),
        ("qwen3_moe", REAPModifier(sparsity=0.1), "must keep between 1 and 7"),
        (
            "deepseek_v3",
            REAPModifier(num_experts=5),
            "split evenly over the router's n_group=2",
        ),
        # 6 of 8 removed -> 1 per group, but groups are scored by their top-2 experts
        ("deepseek_v3", AIMERModifier(sparsity=0.75), "top 2 experts"),
    ],
)
def test_infeasible_budget_fails_before_calibration(
    load_tiny, calibration, no_calibration, model_type, modifier, message
):
    model, tokenizer, _ = load_tiny(model_type)
    with pytest.raises(ValueError, match=message):
        oneshot(
            model=model,
            dataset=calibration(model_type),
            recipe=[modifier],
            processor=tokenizer,
        )


def test_model_without_moe_layers(
    tmp_path, tiny_model_dir, calibration, no_calibration
):
    config = LlamaConfig(
        hidden_size=128,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        vocab_size=512,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir("qwen3_moe"))
    with pytest.raises(ValueError, match="not an MoE model"):
        oneshot(
            model=model,
            dataset=calibration("qwen3_moe"),
            recipe=[REAPModifier(sparsity=0.25)],
            processor=tokenizer,
        )


def test_all_layers_ignored(load_tiny, calibration, no_calibration):
    model, tokenizer, _ = load_tiny("mixtral")
    with pytest.raises(MoEModelError, match="No MoE layers found"):
        oneshot(
            model=model,
            dataset=calibration("mixtral"),
            processor=tokenizer,
            recipe=[REAPModifier(sparsity=0.25, ignore=["re:.*"])],
        )
