"""
Llama-4's input-weighted experts (ream_modifiers/moe/input_weighted.py): the
adapted block computes what transformers' block computes, statistics see each
expert's real contribution f_e(s x), the merge replay reproduces the block, and
saving gives back the hub's fused layout.
"""

from __future__ import annotations

import pytest
import torch
from llmcompressor.modeling.moe.context import moe_calibration_context
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from ream_modifiers.engines.reproduction import expert_output, routed_output
from ream_modifiers.modifiers import REAPModifier
from ream_modifiers.moe import find_moe_layers
from ream_modifiers.moe.input_weighted import (
    InputWeightedMoeBlock,
    adapt_input_weighted_blocks,
)
from ream_modifiers.observe import (
    LayerStatsCollector,
    MeanExpertOutput,
    RoutedExpertSums,
)
from tests.conftest import hook_registrar, run_modifier, sample_input_ids

FAMILY = "llama4_text"


def _fused_contributions(block, hidden: torch.Tensor) -> torch.Tensor:
    """``[E, T, H]`` f_e(s_e x) from transformers' own fused block (0 where the
    expert is not chosen): the oracle, independent of our modules."""
    scores, _ = block.router(hidden)  # [T, E], zero where not chosen
    experts = block.experts
    routed_in = hidden[None] * scores.T[..., None]  # [E, T, H]
    gate_up = torch.bmm(routed_in, experts.gate_up_proj)
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.bmm(up * experts.act_fn(gate), experts.down_proj)


def _block_input(model, ids: torch.Tensor) -> tuple[torch.Tensor, object]:
    block = model.model.layers[1].feed_forward
    seen = {}
    handle = block.register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    with torch.no_grad():
        model(ids)
    handle.remove()
    return seen["x"].reshape(-1, seen["x"].shape[-1]), block


@pytest.mark.parametrize("all_experts", [False, True])
def test_the_adapted_block_computes_what_transformers_computes(
    tiny_model_dir, load_tiny, all_experts
):
    ids = sample_input_ids(batch=2, length=12)
    original = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir(FAMILY), dtype=torch.float32
    )
    model, _, _ = load_tiny(FAMILY)
    assert isinstance(model.model.layers[1].feed_forward, InputWeightedMoeBlock)
    with torch.no_grad():
        expected = original(ids).logits
        if all_experts:
            with moe_calibration_context():
                logits = model(ids).logits
        else:
            logits = model(ids).logits
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    # the adaptation is idempotent: nothing left to adapt
    assert adapt_input_weighted_blocks(model) == 0


@pytest.mark.parametrize("all_experts", [False, True])
def test_statistics_see_each_experts_contribution(
    tiny_model_dir, load_tiny, all_experts
):
    """REAP's weighted norm sums ||f_e(s x)||, the expert's actual contribution
    (not s ||f_e(x)||); on every token, an expert's output per unit score is
    f_e(s_e x) / s_e with s_e its sigmoid score."""
    ids = sample_input_ids(batch=2, length=12)
    original = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir(FAMILY), dtype=torch.float32
    )
    hidden, block = _block_input(original, ids)
    with torch.no_grad():
        contributions = _fused_contributions(block, hidden).double()  # [E, T, H]
        logits = hidden @ block.router.weight.T
    chosen = logits.argmax(-1)  # top-1
    model, _, _ = load_tiny(FAMILY)
    layer = find_moe_layers(model)[0]
    statistics = [RoutedExpertSums(8)]
    if all_experts:
        statistics.append(MeanExpertOutput(8))
    collector = LayerStatsCollector(layer, statistics)
    handles: list = []
    collector.attach(hook_registrar(handles))
    with torch.no_grad():
        if all_experts:
            with moe_calibration_context():
                model(ids)
        else:
            model(ids)
    for handle in handles:
        handle.remove()
    sums = collector["routed"].tensors
    for expert in range(8):
        mine = chosen == expert
        norms = contributions[expert, mine].norm(dim=-1)
        assert int(sums["count"][expert]) == int(mine.sum())
        torch.testing.assert_close(
            sums["weighted_norm"][expert], norms.sum(), rtol=1e-5, atol=1e-6
        )
    if all_experts:
        with torch.no_grad():
            scores = torch.sigmoid(logits).double()  # [T, E]
            experts = layer.expert_modules()
            per_unit = torch.stack(
                [
                    experts[e](hidden * scores[:, e, None].float()).double()
                    / scores[:, e, None]
                    for e in range(8)
                ]
            )
        torch.testing.assert_close(
            collector["mean_output"].mean(),
            per_unit.mean(dim=1),
            rtol=1e-5,
            atol=1e-6,
        )


def test_the_merge_replay_reproduces_the_block(tiny_model_dir, load_tiny):
    """``routed_output`` with input weighting is the block's routed output."""
    ids = sample_input_ids(batch=2, length=12)
    original = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir(FAMILY), dtype=torch.float32
    )
    hidden, block = _block_input(original, ids)
    with torch.no_grad():
        expected = _fused_contributions(block, hidden).sum(0)
    model, _, _ = load_tiny(FAMILY)
    layer = find_moe_layers(model)[0]
    weights = layer.stacked_weights()
    activate = layer.activation()

    def output_of(expert, tokens):
        return expert_output(weights, tokens, activate, expert)

    with torch.no_grad():
        replay = routed_output(hidden, *layer.route(hidden), output_of, True)
        output_side = routed_output(hidden, *layer.route(hidden), output_of)
    torch.testing.assert_close(replay, expected, rtol=1e-5, atol=1e-6)
    # the other convention is measurably different on this model
    assert (output_side - expected).abs().max() > 1e-3


def test_pruning_saves_the_kept_experts_in_the_hub_fused_layout(
    tiny_model_dir, load_tiny, calibration, tmp_path
):
    source = load_file(tiny_model_dir(FAMILY) / "model.safetensors")
    model, tokenizer, _ = load_tiny(FAMILY)
    modifier = REAPModifier(sparsity=0.25, report_path=str(tmp_path / "report.json"))
    report = run_modifier(model, tokenizer, calibration(FAMILY), modifier)
    model.save_pretrained(tmp_path / "out")
    saved = load_file(tmp_path / "out" / "model.safetensors")
    for name, entry in report["layers"].items():
        kept = entry["kept"]
        for tensor in ("gate_up_proj", "down_proj"):
            key = f"{name}.experts.{tensor}"
            assert torch.equal(saved[key], source[key][kept]), key
        router = f"{name}.router.weight"
        assert torch.equal(saved[router], source[router][kept])
    assert not any(".experts.0." in key for key in saved)


def test_experts_linearized_by_another_class_are_refused_before_calibration(
    tiny_model_dir, monkeypatch
):
    """llm-compressor's own Llama-4 class (what a model linearized before our
    registration holds) keeps the fused call; the error says what to do."""
    from llmcompressor.modeling.moe.linear_experts import LinearExperts2D
    from llmcompressor.modeling.moe.linearize import linearize_moe
    from llmcompressor.modeling.moe.llama4 import Llama4LinearExperts
    from transformers.models.llama4.modeling_llama4 import Llama4TextExperts

    from ream_modifiers.moe.auto import auto_model_class

    path = tiny_model_dir("llama4")
    model = auto_model_class(AutoConfig.from_pretrained(path)).from_pretrained(path)
    monkeypatch.setitem(
        LinearExperts2D._registry, Llama4TextExperts, Llama4LinearExperts
    )
    linearize_moe(model)
    with pytest.raises(TypeError, match="Import ream_modifiers before loading"):
        find_moe_layers(model)
