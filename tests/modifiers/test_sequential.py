"""Subgraph targets: refused inside MoE blocks, split around the reduction."""

import pytest
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

from ream_modifiers import REAMModifier, REAPModifier
from ream_modifiers.modifiers.sequential import (
    protect_routers,
    split_at_expert_reduction,
)
from tests.conftest import NUM_SAMPLES, SEQ_LEN


@pytest.mark.parametrize(
    "targets, refused",
    [
        (["Qwen3MoeAttention", "ExpertMLP"], True),
        (["re:.*mlp.experts.3$"], True),
        (["Qwen3MoeDecoderLayer"], False),
        (["Qwen3MoeSparseMoeBlock", "Qwen3MoeAttention"], False),
    ],
)
def test_targets_inside_moe_blocks_fail_before_calibration(
    load_tiny, calibration, no_calibration, targets, refused
):
    model, tokenizer, _ = load_tiny("qwen3_moe")
    run = dict(
        model=model,
        dataset=calibration("qwen3_moe"),
        recipe=[REAPModifier(num_experts=6)],
        processor=tokenizer,
        num_calibration_samples=NUM_SAMPLES,
        max_seq_length=SEQ_LEN,
        sequential_targets=targets,
    )
    if refused:
        with pytest.raises(ValueError, match="needs each MoE block whole"):
            oneshot(**run)
    else:  # accepted: it gets as far as calibration
        with pytest.raises(AssertionError, match="calibration started"):
            oneshot(**run)


def test_split_at_the_last_reduction_and_protect_routers(load_tiny):
    model, _, _ = load_tiny("qwen3_moe")
    first = QuantizationModifier(targets=["Linear"], scheme="W8A8", ignore=[])
    reap, ream = REAPModifier(num_experts=7), REAMModifier(num_experts=6)
    gptq = GPTQModifier(targets=["Linear"], scheme="W4A16", ignore=["lm_head"])
    assert split_at_expert_reduction([first, reap, ream, gptq]) == (
        [first, reap, ream],
        [gptq],
    )
    assert split_at_expert_reduction([gptq]) == ([], [gptq])
    protect_routers(model, [reap], [gptq])
    assert gptq.ignore == ["lm_head", "re:.*mlp.gate$", "re:.*mlp.shared_expert_gate$"]
    unprotected = GPTQModifier(targets=["Linear"], scheme="W4A16", ignore=[])
    protect_routers(
        model, [REAPModifier(num_experts=7, protect_routers=False)], [unprotected]
    )
    assert unprotected.ignore == []
