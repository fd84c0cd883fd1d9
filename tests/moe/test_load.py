import pytest
import torch
from transformers import AutoModelForCausalLM

from ream_modifiers.moe import find_moe_layers, load_moe_model


@pytest.mark.parametrize("use_load_context", [True, False])
def test_both_load_paths_give_the_checkpoint_weights(tiny_model_dir, use_load_context):
    path = tiny_model_dir("qwen3_moe")
    fused = AutoModelForCausalLM.from_pretrained(path)
    model = load_moe_model(path, use_load_context=use_load_context)
    layer = find_moe_layers(model)[1]
    reference = fused.model.layers[1].mlp.experts
    # fused gate_up_proj is [E, 2I, H]: rows [:I] are the gate
    assert torch.equal(
        layer.expert(5).gate_proj.weight, reference.gate_up_proj[5, :128]
    )
    assert torch.equal(layer.expert(5).up_proj.weight, reference.gate_up_proj[5, 128:])
    assert torch.equal(layer.expert(5).down_proj.weight, reference.down_proj[5])
    ids = torch.arange(12).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(
            model(ids).logits, fused(ids).logits, rtol=1e-5, atol=1e-5
        )
