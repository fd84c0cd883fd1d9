import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.conversion_mapping import (
    get_checkpoint_conversion_mapping,
    register_checkpoint_conversion_mapping,
)

from ream_modifiers.moe import find_moe_layers, load_moe_model
from ream_modifiers.moe.auto import auto_model_class

# names vLLM 0.32 reads (its modules: kimi_k3/nvidia/model.py's decoder layer
# keeps a dense layer's `mlp` and a MoE layer's `block_sparse_moe`, and loads
# q/k/v_conv1d into `conv1d`; kimi_k25.py and kimi_k25_vit.py for Kimi-K2.5),
# which transformers' own reverse mappings do not all give back
VLLM_NAMES = {
    "kimi_linear": [
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.1.block_sparse_moe.experts.0.w1.weight",
        "model.layers.1.block_sparse_moe.gate.weight",
        "model.layers.1.block_sparse_moe.gate.e_score_correction_bias",
        "model.layers.1.block_sparse_moe.shared_experts.down_proj.weight",
        "model.layers.1.self_attn.q_conv1d.weight",
        "model.layers.1.self_attn.f_a_proj.weight",
        "model.layers.1.self_attn.A_log",
    ],
    "kimi_k25": [
        "language_model.model.layers.0.mlp.gate_proj.weight",
        "language_model.model.layers.1.mlp.experts.0.gate_proj.weight",
        "language_model.model.norm.weight",
        "language_model.lm_head.weight",
        "vision_tower.patch_embed.proj.weight",
        "vision_tower.patch_embed.pos_emb.weight",
        "vision_tower.encoder.blocks.0.wqkv.weight",
        "vision_tower.encoder.blocks.0.wo.weight",
        "vision_tower.encoder.blocks.0.norm0.weight",
        "vision_tower.encoder.blocks.0.mlp.fc0.weight",
        "vision_tower.encoder.final_layernorm.weight",
        "mm_projector.pre_norm.weight",
        "mm_projector.proj.0.weight",
        "mm_projector.proj.2.weight",
    ],
}


@pytest.mark.parametrize("family", sorted(VLLM_NAMES))
def test_kimi_outputs_carry_the_names_vllm_reads(tiny_model_dir, tmp_path, family):
    from safetensors import safe_open

    model = load_moe_model(tiny_model_dir(family), dtype=torch.float32)
    model.save_pretrained(tmp_path / "out")
    with safe_open(next((tmp_path / "out").glob("*.safetensors")), "pt") as handle:
        saved = set(handle.keys())
    assert set(VLLM_NAMES[family]) <= saved
    assert not any(".blocks." in name for name in saved if "vision" not in name)


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


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_in_memory_load_builds_no_fused_copy_of_the_experts(
    tiny_model_dir, monkeypatch, family
):
    """
    Without load_context(), the experts are built per expert at construction and
    filled from the checkpoint: the fused experts class is never instantiated.
    Loading fused and linearizing afterwards held both copies of every expert
    at once (1.9x the model's bytes while loading, BENCHMARKS.md "Memory").
    """
    from llmcompressor.modeling.moe.linearize import get_linearize_load_mappings

    path = tiny_model_dir(family)  # built (with fused experts) before counting
    fused_cls = get_linearize_load_mappings(family)[0]
    built = []
    original = fused_cls.__init__

    def counting_init(self, *args, **kwargs):
        built.append(type(self).__name__)
        original(self, *args, **kwargs)

    monkeypatch.setattr(fused_cls, "__init__", counting_init)
    model = load_moe_model(path, use_load_context=False)
    assert built == []
    assert len(find_moe_layers(model)) == 2


def test_kimi_k2_checkpoint_loads_its_experts_not_random_ones(tiny_model_dir, tmp_path):
    """
    A Kimi-K2 checkpoint is DeepSeek-V3 weights in the hub's per-expert layout
    under ``model_type: kimi_k2``; without a conversion mapping registered for
    that type transformers would leave the fused experts random.
    """
    import json
    import shutil

    source = tiny_model_dir("deepseek_v3")
    kimi = tmp_path / "kimi"
    shutil.copytree(source, kimi)
    config = json.loads((kimi / "config.json").read_text())
    config["model_type"] = "kimi_k2"
    (kimi / "config.json").write_text(json.dumps(config))

    reference = AutoModelForCausalLM.from_pretrained(source)
    model = load_moe_model(kimi, dtype=torch.float32)
    assert model.config.model_type == "kimi_k2"
    layer = find_moe_layers(model)[0]
    fused = reference.model.layers[1].mlp.experts
    for e in (0, 5):
        assert torch.equal(
            layer.expert(e).gate_proj.weight, fused.gate_up_proj[e, :128]
        )
        assert torch.equal(layer.expert(e).up_proj.weight, fused.gate_up_proj[e, 128:])
        assert torch.equal(layer.expert(e).down_proj.weight, fused.down_proj[e])
    assert torch.equal(
        layer.correction_bias,
        reference.model.layers[1].mlp.gate.e_score_correction_bias,
    )


def test_kimi_k2_mapping_is_registered_on_import():
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    import ream_modifiers  # noqa: F401

    mapping = get_checkpoint_conversion_mapping("kimi_k2")
    reference = get_checkpoint_conversion_mapping("deepseek_v3")
    assert mapping is not None
    assert [m.target_patterns for m in mapping] == [
        m.target_patterns for m in reference
    ]


HUB_FAMILIES = ["gpt_oss", "mixtral", "hy_v3", "phimoe", "lfm2_moe", "kimi_linear"]


@pytest.mark.parametrize("family", [*HUB_FAMILIES, "kimi_k25"])
def test_a_linearized_model_saves_under_the_hub_names(tiny_model_dir, tmp_path, family):
    """
    gpt-oss is saved fused like the hub; the families whose hub names differ
    from transformers' get them back, Kimi-Linear also its q/k/v conv1d and
    Kimi-K2.5 its vision wqkv (transformers' converters, kept on save).
    """
    from safetensors import safe_open

    path = tiny_model_dir(family)
    model = load_moe_model(path, dtype=torch.float32)
    model.save_pretrained(tmp_path / "out")
    with safe_open(next((tmp_path / "out").glob("*.safetensors")), "pt") as handle:
        saved = set(handle.keys())
    with safe_open(next(path.glob("*.safetensors")), "pt") as handle:
        hub = set(handle.keys())
    assert saved == hub
    ids = torch.arange(12).unsqueeze(0)
    reloaded = auto_model_class(model.config).from_pretrained(tmp_path / "out")
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5
        )


def _remote_code_model(source, target, marker):
    """A copy of ``source`` whose config points at code that leaves ``marker``."""
    shutil.copytree(source, target)
    (target / "configuration_x.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM\n\n\n"
        "class XConfig(Qwen3MoeConfig):\n"
        "    model_type = 'x_moe'\n\n\n"
        "class XForCausalLM(Qwen3MoeForCausalLM):\n"
        "    config_class = XConfig\n"
    )
    config = json.loads((target / "config.json").read_text())
    config["model_type"] = "x_moe"
    config["auto_map"] = {
        "AutoConfig": "configuration_x.XConfig",
        "AutoModelForCausalLM": "configuration_x.XForCausalLM",
    }
    (target / "config.json").write_text(json.dumps(config))
    return target


@pytest.mark.parametrize("use_load_context", [True, False])
def test_remote_code_runs_only_when_trusted(tiny_model_dir, tmp_path, use_load_context):
    marker = tmp_path / "ran"
    path = _remote_code_model(tiny_model_dir("qwen3_moe"), tmp_path / "m", marker)
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        load_moe_model(path, use_load_context=use_load_context)
    assert not marker.exists()
    if use_load_context:
        return  # the trusted path is the same for both after the config
    register_checkpoint_conversion_mapping(
        "x_moe", get_checkpoint_conversion_mapping("qwen3_moe"), overwrite=True
    )
    model = load_moe_model(path, use_load_context=False, trust_remote_code=True)
    assert marker.read_text() == "ran"
    assert type(model).__name__ == "XForCausalLM"
    assert find_moe_layers(model)[0].num_experts == 8


def test_load_context_path_survives_a_from_pretrained_that_post_processes(
    tiny_model_dir, monkeypatch
):
    """compressed-tensors' offloading patch calls ``model.modules()`` on what
    ``from_pretrained`` returns, so the loader must not ask for a (model, info)
    tuple there; missing weights must still be refused."""
    import contextlib

    import llmcompressor.utils

    seen = []

    @contextlib.contextmanager
    def post_processing_context():
        original = AutoModelForCausalLM.from_pretrained.__func__

        def patched(cls, *args, **kwargs):
            model = original(cls, *args, **kwargs)
            seen.append(sum(1 for _ in model.modules()))  # fails on a tuple
            return model

        monkeypatch.setattr(
            AutoModelForCausalLM, "from_pretrained", classmethod(patched)
        )
        yield

    monkeypatch.setattr(llmcompressor.utils, "load_context", post_processing_context)
    path = tiny_model_dir("qwen3_moe")
    model = load_moe_model(path, use_load_context=True)
    assert seen and find_moe_layers(model)

    broken = path.parent / "broken"
    shutil.copytree(path, broken)
    from safetensors.torch import load_file, save_file

    weights = load_file(broken / "model.safetensors")
    dropped = next(k for k in weights if "layers.0.self_attn.q_proj" in k)
    del weights[dropped]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing from the checkpoint"):
        load_moe_model(broken, use_load_context=True)
