"""
Tiny random MoE models built locally from transformers configs, with a byte-level
BPE tokenizer trained on the bundled corpus. They serve the demo and the tests;
nothing is downloaded.

Sizes keep every quantizable ``Linear`` input a multiple of 128, W4A16's group
size, so GPTQ runs on them unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from ream_modifiers.data.calibration import bundled_texts

__all__ = ["TINY_CONFIGS", "build_tokenizer", "build_tiny_moe"]

_RANDOMIZED_SUFFIXES = (
    "e_score_correction_bias",
    "experts.gate_up_proj_bias",
    "experts.down_proj_bias",
    "router.bias",
)

_COMMON = dict(
    vocab_size=512,
    hidden_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)

# Per model_type: config kwargs of a 2-MoE-layer model with 8 experts, top-2.
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "qwen3_moe": dict(
        _COMMON,
        num_hidden_layers=2,
        intermediate_size=256,
        moe_intermediate_size=128,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
    ),
    "mixtral": dict(
        _COMMON,
        num_hidden_layers=2,
        intermediate_size=128,
        num_local_experts=8,
        num_experts_per_tok=2,
    ),
    "deepseek_v3": dict(
        {k: v for k, v in _COMMON.items() if k != "head_dim"},
        num_hidden_layers=3,
        first_k_dense_replace=1,
        intermediate_size=256,
        moe_intermediate_size=128,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        kv_lora_rank=128,
        q_lora_rank=None,
        qk_rope_head_dim=16,
        qk_nope_head_dim=16,
        v_head_dim=32,
        num_key_value_heads=4,
        # hub DeepSeek-V3 configs carry these; vLLM needs them
        topk_method="noaux_tc",
        scoring_func="sigmoid",
    ),
}


# Qwen2-MoE: Qwen3-MoE's layout plus a gated shared expert, no renormalisation.
TINY_CONFIGS["qwen2_moe"] = dict(
    TINY_CONFIGS["qwen3_moe"], shared_expert_intermediate_size=128, norm_topk_prob=False
)
# Qwen3-Next: Qwen2-MoE's MoE block behind one linear-attention (Gated DeltaNet)
# layer and one full-attention layer.
TINY_CONFIGS["qwen3_next"] = dict(
    TINY_CONFIGS["qwen2_moe"],
    norm_topk_prob=True,
    layer_types=["linear_attention", "full_attention"],
    linear_conv_kernel_dim=4,
    linear_key_head_dim=32,
    linear_value_head_dim=32,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
)
# OLMoE: softmax over all experts without renormalisation.
TINY_CONFIGS["olmoe"] = dict(
    _COMMON,
    num_hidden_layers=2,
    intermediate_size=128,
    num_experts=8,
    num_experts_per_tok=2,
    norm_topk_prob=False,
)
# DeepSeek-V2: MLA, softmax with group-limited greedy selection (group max), no
# renormalisation, a scaling factor and an ungated shared expert.
TINY_CONFIGS["deepseek_v2"] = dict(
    TINY_CONFIGS["deepseek_v3"],
    topk_method="group_limited_greedy",
    routed_scaling_factor=1.0,
    norm_topk_prob=False,
)
for _key in ("scoring_func",):
    TINY_CONFIGS["deepseek_v2"].pop(_key)
# GLM-4.5: DeepSeek-V3's router (sigmoid + correction bias) with plain attention.
TINY_CONFIGS["glm4_moe"] = dict(
    _COMMON,
    num_hidden_layers=3,
    first_k_dense_replace=1,
    intermediate_size=256,
    moe_intermediate_size=128,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=2,
    n_group=1,
    topk_group=1,
    routed_scaling_factor=2.5,
    norm_topk_prob=True,
)
# dots1: DeepSeek-V3's router with grouped experts and Qwen-style attention. The
# hub config's `topk_method` is what makes vLLM create the correction bias.
TINY_CONFIGS["dots1"] = dict(
    TINY_CONFIGS["glm4_moe"],
    n_group=2,
    topk_group=1,
    routed_scaling_factor=1.0,
    topk_method="noaux_tc",
    scoring_func="sigmoid",
)
# ERNIE-4.5: softmax, selection bias in ``gate.moe_statics``, MoE from layer 1.
TINY_CONFIGS["ernie4_5_moe"] = dict(
    _COMMON,
    num_hidden_layers=3,
    intermediate_size=256,
    moe_intermediate_size=128,
    moe_num_experts=8,
    moe_k=2,
    moe_num_shared_experts=1,
    moe_layer_start_index=1,
    moe_layer_end_index=2,
    moe_layer_interval=1,
)
# MiniMax-M2: sigmoid routing with a selection bias on the MoE block. vLLM reads
# the hub config's `scoring_func` and creates the bias only for `use_routing_bias`.
TINY_CONFIGS["minimax_m2"] = dict(
    _COMMON,
    num_hidden_layers=2,
    intermediate_size=128,
    num_local_experts=8,
    num_experts_per_tok=2,
    scoring_func="sigmoid",
    use_routing_bias=True,
    # hub configs carry it and vLLM reads it; transformers rotates the whole head
    rotary_dim=_COMMON["head_dim"],
)
# Hunyuan-MoE: router is ``gate.wg`` (an nn.Linear), an always-on shared MLP.
TINY_CONFIGS["hunyuan_v1_moe"] = dict(
    _COMMON,
    num_hidden_layers=2,
    intermediate_size=128,
    num_experts=8,
    moe_topk=2,
)
# gpt-oss: transposed, interleaved gate/up with biases, router with a logit bias.
TINY_CONFIGS["gpt_oss"] = dict(
    _COMMON,
    num_hidden_layers=2,
    intermediate_size=128,
    num_local_experts=8,
    num_experts_per_tok=2,
    sliding_window=16,
    layer_types=["sliding_attention", "full_attention"],
)


def build_tokenizer(
    vocab_size: int = 512, texts: Iterable[str] | None = None
) -> PreTrainedTokenizerFast:
    """
    A byte-level BPE tokenizer trained (deterministically) on ``texts``, by default
    the bundled corpus.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = bundled_texts("mix") if texts is None else texts
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )


def build_tiny_moe(
    model_type: str,
    save_dir: str | os.PathLike,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    **overrides: Any,
) -> Path:
    """
    Build a tiny random MoE of ``model_type``, save it with its tokenizer, and
    return the directory. Score-correction biases get random values so that
    routing tests exercise them.

    :param model_type: a key of :data:`TINY_CONFIGS`
    :param save_dir: where to save the model and tokenizer
    :param seed: weights seed
    :param overrides: config kwargs overriding the tiny defaults
    """
    if model_type not in TINY_CONFIGS:
        raise ValueError(
            f"no tiny config for {model_type!r}; have {sorted(TINY_CONFIGS)}"
        )
    config = AutoConfig.for_model(
        model_type, **{**TINY_CONFIGS[model_type], **overrides}
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():
        # selection biases (buffers, or ERNIE's frozen parameter) and the expert
        # and router biases start at zero; random values make pruning and merging
        # tests notice a bias that does not follow its expert
        tensors = dict(model.named_buffers())
        tensors.update(model.named_parameters())
        for name, tensor in tensors.items():
            if name.endswith(_RANDOMIZED_SUFFIXES):
                tensor.copy_(torch.randn_like(tensor) * 0.05)
    save_dir = Path(save_dir)
    model.save_pretrained(save_dir)
    build_tokenizer(config.vocab_size).save_pretrained(save_dir)
    return save_dir
