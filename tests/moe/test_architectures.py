import pytest
from loguru import logger
from transformers import AutoConfig, LlamaConfig

from ream_modifiers.moe.architectures import (
    ARCHITECTURES,
    UNSUPPORTED_FAMILIES,
    UnsupportedFamilyError,
    get_arch_spec,
)
from ream_modifiers.moe.routing import RoutingSpec
from ream_modifiers.tiny import TINY_CONFIGS

REQUIRED = ["qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "deepseek_v3", "glm4_moe"]


@pytest.mark.parametrize("model_type", REQUIRED)
def test_required_rows_exist_and_name_real_config_keys(model_type):
    spec = ARCHITECTURES[model_type]
    config = AutoConfig.for_model(model_type)
    for key in (*spec.num_experts_keys, spec.top_k_key):
        assert isinstance(getattr(config, key), int), key
    for pattern in ("lm_head", "re:.*mlp.gate$"):
        assert pattern in spec.quantization_ignore


def test_qwen2_moe_protects_shared_expert_gate():
    spec = ARCHITECTURES["qwen2_moe"]
    assert spec.shared_expert_gate_attr == "shared_expert_gate"
    assert "re:.*mlp.shared_expert_gate$" in spec.quantization_ignore


@pytest.mark.parametrize(
    "model_type, expected",
    [
        ("qwen3_moe", dict(scoring="softmax", renormalize=True, n_group=None)),
        ("mixtral", dict(scoring="softmax", renormalize=True, n_group=None)),
        ("deepseek_v3", dict(scoring="sigmoid", n_group=2, topk_group=1)),
    ],
)
def test_routing_spec_from_config(model_type, expected):
    config = AutoConfig.for_model(model_type, **TINY_CONFIGS[model_type])
    routing = RoutingSpec.from_config(config, get_arch_spec(config))
    assert routing.num_experts == 8 and routing.top_k == 2
    for key, value in expected.items():
        assert getattr(routing, key) == value
    if model_type == "deepseek_v3":
        assert routing.scaling_factor == 2.5 and routing.group_size == 4


def test_unknown_moe_type_is_detected_with_a_warning():
    config = AutoConfig.for_model("qwen3_moe", **TINY_CONFIGS["qwen3_moe"])
    config.model_type = "my_new_moe"
    messages = []
    handle = logger.add(messages.append, level="WARNING")
    try:
        spec = get_arch_spec(config)
    finally:
        logger.remove(handle)
    assert spec.model_type == "my_new_moe"
    assert (
        "num_experts" in spec.num_experts_keys
        and spec.top_k_key == "num_experts_per_tok"
    )
    assert any("No architecture row" in str(m) for m in messages)


def test_dense_config_is_rejected_with_a_clear_error():
    with pytest.raises(ValueError, match="not an MoE model"):
        get_arch_spec(LlamaConfig(hidden_size=64))


ALL_FAMILIES = sorted(TINY_CONFIGS)
# tiny families routed top-1, as their checkpoints are (vLLM's CPU MoE applies
# Llama-4's input-side weights for one expert per token only)
TOP_1 = {"llama4_text", "llama4"}


@pytest.mark.parametrize("model_type", ALL_FAMILIES)
def test_every_tiny_family_has_a_row_naming_real_config_keys(model_type):
    spec = ARCHITECTURES[model_type]
    # a vision-language wrapper's keys are in its text config
    config = AutoConfig.for_model(model_type, **TINY_CONFIGS[model_type])
    config = config.get_text_config()
    for key in (*spec.num_experts_keys, spec.top_k_key):
        top_k = 1 if model_type in TOP_1 else 2
        assert getattr(config, key) == (8 if key != spec.top_k_key else top_k), key
    # the key the family serialises is among those rewritten after a change
    assert set(spec.num_experts_keys) & set(config.to_dict())
    assert "lm_head" in spec.quantization_ignore


@pytest.mark.parametrize(
    "topk_method, n_group", [("group_limited_greedy", 2), ("greedy", None)]
)
def test_deepseek_v2_groups_only_with_group_limited_greedy(topk_method, n_group):
    kwargs = dict(TINY_CONFIGS["deepseek_v2"], topk_method=topk_method)
    config = AutoConfig.for_model("deepseek_v2", **kwargs)
    routing = RoutingSpec.from_config(config, get_arch_spec(config))
    assert routing.n_group == n_group and routing.group_score == "max"


@pytest.mark.parametrize(
    "model_type, router, bias",
    [
        ("hunyuan_v1_moe", "gate.wg", None),
        ("gpt_oss", "router", None),
        ("ernie4_5_moe", "gate", "moe_statics.e_score_correction_bias"),
        ("minimax_m2", "gate", "e_score_correction_bias"),
    ],
)
def test_rows_name_nested_routers_and_biases(model_type, router, bias):
    spec = ARCHITECTURES[model_type]
    assert spec.router_attr == router and spec.bias_attr == bias
    # a router that is an nn.Linear must be kept away from GPTQ
    assert any(p.endswith(router + "$") for p in spec.quantization_ignore)


@pytest.mark.parametrize("model_type", sorted(UNSUPPORTED_FAMILIES))
def test_refused_families_are_refused_by_their_default_config(model_type):
    """Every refused model_type, built by transformers' own config class (a
    wrapper with its default language model), raises with the reason."""
    family = UNSUPPORTED_FAMILIES[model_type]
    with pytest.raises(UnsupportedFamilyError) as refused:
        get_arch_spec(AutoConfig.for_model(model_type))
    assert f"{family.name} (model_type " in str(refused.value)
    assert family.fix in str(refused.value)


def test_transformers_still_cannot_load_longcat_flash_in_its_hub_layout(tmp_path):
    """
    Why LongCat-Flash is refused: transformers sizes its fused experts for the
    identity experts too, so the hub's tensors (real experts only) do not fit.
    The day this loads, the family can be built (README, its table row).
    """
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    config = AutoConfig.for_model(
        "longcat_flash",
        vocab_size=512,
        hidden_size=128,
        num_layers=1,
        num_attention_heads=2,
        n_routed_experts=8,
        zero_expert_num=4,
        moe_topk=2,
        expert_ffn_hidden_size=64,
        ffn_hidden_size=128,
        q_lora_rank=64,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=32,
        v_head_dim=32,
    )
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(
        tmp_path
    )
    weights = tmp_path / "model.safetensors"
    # the hub layout: per-expert tensors of the 8 real experts only
    state = {
        name: tensor
        for name, tensor in load_file(weights).items()
        if not any(f".experts.{i}." in name for i in range(8, 12))
    }
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_a_refused_wrapper_is_refused_although_its_language_model_is_supported(
    monkeypatch,
):
    config = AutoConfig.for_model("qwen3_vl_moe")
    assert config.text_config.model_type in ARCHITECTURES
    refused = UNSUPPORTED_FAMILIES["longcat_flash"]
    monkeypatch.setitem(UNSUPPORTED_FAMILIES, "qwen3_vl_moe", refused)
    with pytest.raises(UnsupportedFamilyError, match="LongCat-Flash"):
        get_arch_spec(config)


def test_a_wrapper_with_its_own_row_gets_it_not_its_language_models():
    """Kimi-K2.5's language model is a deepseek_v3 model; the wrapper's row adds
    the vision tower's ignore entries and the hub's save names."""
    config = AutoConfig.for_model("kimi_k25")
    assert config.text_config.model_type == "deepseek_v3"
    spec = get_arch_spec(config)
    assert spec.model_type == "kimi_k25"
    assert "re:.*vision_tower.*" in spec.quantization_ignore
