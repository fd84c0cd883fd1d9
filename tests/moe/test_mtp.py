"""MTP layers carried from the source checkpoint, reduced by the AIMER rule."""

import json
from pathlib import Path

import pytest
import torch
from llmcompressor.core import reset_session
from safetensors import safe_open
from transformers import AutoConfig

from ream_modifiers.check import check_checkpoint
from ream_modifiers.cli import compress
from ream_modifiers.engines.selection import ExpertBudget, select_kept
from ream_modifiers.modifiers.aimer.score import aimer_score
from ream_modifiers.moe.architectures import ARCHITECTURES
from ream_modifiers.moe.mtp import find_mtp_layers
from ream_modifiers.tiny import build_tiny_moe
from tests.check.editing import edited

MTP = "model.layers.3"  # the tiny DeepSeek-V3 has 3 trunk layers
PROJECTIONS = ("down_proj", "gate_proj", "up_proj")


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in sorted(directory.glob("*.safetensors")):
        with safe_open(shard, "pt") as handle:
            tensors.update({n: handle.get_tensor(n) for n in handle.keys()})
    return tensors


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return build_tiny_moe(
        "deepseek_v3", tmp_path_factory.mktemp("mtp") / "model", mtp_layers=1
    )


def _compress(source: Path, recipe: str, out: Path) -> Path:
    reset_session()
    compress(recipe, str(source), "bundled", str(out), num_samples=4, max_seq_len=16)
    reset_session()
    return out


@pytest.fixture(scope="module")
def reap_plain(source, tmp_path_factory) -> Path:
    recipe = tmp_path_factory.mktemp("recipe") / "reap.yaml"
    recipe.write_text(
        "reap_stage:\n  reap_modifiers:\n    REAPModifier: {sparsity: 0.25}\n"
    )
    return _compress(source, str(recipe), tmp_path_factory.mktemp("plain") / "out")


@pytest.fixture(scope="module")
def reap_w4a16(source, tmp_path_factory) -> Path:
    return _compress(source, "reap_w4a16", tmp_path_factory.mktemp("w4a16") / "out")


def test_the_mtp_layer_is_found_only_where_stored(source, tiny_model_dir):
    spec = ARCHITECTURES["deepseek_v3"]
    config = AutoConfig.from_pretrained(source).to_dict()
    (layer,) = find_mtp_layers(source, spec, config)
    assert layer.prefix == MTP
    assert f"{MTP}.eh_proj.weight" in layer.files
    assert f"{MTP}.mlp.experts.7.down_proj.weight" in layer.files
    # transformers' default config declares one MTP layer; no weights, none found
    plain = tiny_model_dir("deepseek_v3")
    assert AutoConfig.from_pretrained(plain).num_nextn_predict_layers == 1
    assert find_mtp_layers(plain, spec, config) == []


def test_mtp_experts_kept_by_the_aimer_rule_per_group(source, reap_plain):
    before, after = _tensors(source), _tensors(reap_plain)
    experts = f"{MTP}.mlp.experts"
    scores = aimer_score(
        [
            torch.stack([before[f"{experts}.{e}.{p}.weight"] for e in range(8)])
            for p in PROJECTIONS
        ]
    )
    # 2 router groups of 4: the highest AIMER score of each group is removed
    kept = select_kept(scores, ExpertBudget(8, 6, n_group=2), remove="highest")
    report = json.loads((reap_plain / "expert_reduction.json").read_text())[-1]
    mtp = report["mtp_layers"][MTP]
    assert mtp["rule"] == "aimer"
    assert mtp["kept"] == kept
    assert len(mtp["removed"]) == 2
    assert mtp["removed"][0] < 4 <= mtp["removed"][1]
    for new, old in enumerate(kept):
        for p in PROJECTIONS:
            name = f"{experts}.{{}}.{p}.weight"
            assert after[name.format(new)].equal(before[name.format(old)])
    assert f"{experts}.6.down_proj.weight" not in after
    index = torch.tensor(kept)
    for name in ("mlp.gate.weight", "mlp.gate.e_score_correction_bias"):
        full = f"{MTP}.{name}"
        assert after[full].equal(before[full][index])


def test_the_rest_of_the_mtp_layer_is_copied_unchanged(source, reap_plain):
    before, after = _tensors(source), _tensors(reap_plain)
    rest = [
        n
        for n in before
        if n.startswith(MTP + ".") and ".experts." not in n and ".gate." not in n
    ]
    assert {f"{MTP}.eh_proj.weight", f"{MTP}.shared_head.head.weight"} <= set(rest)
    assert any(".shared_experts." in n for n in rest)
    for name in rest:
        assert after[name].equal(before[name]), name


def test_the_checker_counts_the_mtp_layer(reap_plain, tmp_path):
    report = check_checkpoint(reap_plain)
    assert report.violations == []
    assert report.experts_per_layer[f"{MTP}.mlp"] == 6
    # an MTP layer left at full width is the one-count violation vLLM hits

    def full_width_mtp(state: dict) -> None:
        for e in (6, 7):
            for p in PROJECTIONS:
                state[f"{MTP}.mlp.experts.{e}.{p}.weight"] = state[
                    f"{MTP}.mlp.experts.0.{p}.weight"
                ].clone()

    broken = tmp_path / "broken"
    edited(reap_plain, broken)
    shard = broken / "model-mtp-00001.safetensors"
    from safetensors.torch import load_file, save_file

    state = load_file(shard)
    full_width_mtp(state)
    save_file(state, shard, metadata={"format": "pt"})
    index = broken / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"].update(dict.fromkeys(state, shard.name))
    index.write_text(json.dumps(data))
    assert check_checkpoint(broken).codes[0] == "non-uniform-experts"


def test_quantized_output_keeps_mtp_unquantized_and_ignored(reap_w4a16):
    after = _tensors(reap_w4a16)
    mtp = [n for n in after if n.startswith(MTP + ".")]
    assert mtp and not [n for n in mtp if "weight_packed" in n]
    assert any("layers.1.mlp.experts.0.down_proj.weight_packed" in n for n in after)
    config = json.loads((reap_w4a16 / "config.json").read_text())
    assert "re:^model\\.layers\\.3\\..*" in config["quantization_config"]["ignore"]
    assert check_checkpoint(reap_w4a16).violations == []


def test_a_tiny_model_of_a_family_without_mtp_refuses_mtp_layers(tmp_path):
    with pytest.raises(ValueError, match="qwen3_moe has no MTP layers"):
        build_tiny_moe("qwen3_moe", tmp_path, mtp_layers=1)


def test_qwen_mtp_module_replaces_llm_compressors_unreduced_copy(tmp_path):
    source = build_tiny_moe("qwen3_next", tmp_path / "model", mtp_layers=1)
    out = _compress(source, "reap_w4a16", tmp_path / "out")
    before, after = _tensors(source), _tensors(out)
    experts = "mtp.layers.0.mlp.experts"
    assert f"{experts}.5.down_proj.weight" in after
    assert f"{experts}.6.down_proj.weight" not in after
    assert after["mtp.layers.0.mlp.gate.weight"].shape == (6, 128)
    for name in (
        "mtp.fc.weight",
        "mtp.norm.weight",
        "mtp.layers.0.self_attn.q_proj.weight",
    ):
        assert after[name].equal(before[name])
    # llm-compressor's full-width copy is gone; its ignore entry covers ours
    assert not (out / "model_mtp.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {
        "model.safetensors",
        "model-mtp-00001.safetensors",
        "model-mtp-00002.safetensors",
    }
    ignore = json.loads((out / "config.json").read_text())["quantization_config"][
        "ignore"
    ]
    assert [entry for entry in ignore if "mtp" in entry] == ["re:^mtp.*"]
    report = json.loads((out / "expert_reduction.json").read_text())[-1]
    assert list(report["mtp_layers"]) == ["mtp.layers.0"]
    assert check_checkpoint(out).experts_per_layer["mtp.layers.0.mlp"] == 6


def test_a_dense_mtp_module_is_carried_unchanged(tmp_path):
    # K-EXAONE's `mtp.*` module has a dense MLP: nothing to reduce, all copied
    import shutil

    from safetensors.torch import load_file, save_file

    from ream_modifiers.moe.mtp import carry_mtp_layers

    source = build_tiny_moe("exaone_moe", tmp_path / "source")
    target = tmp_path / "target"
    shutil.copytree(source, target)
    generator = torch.Generator().manual_seed(0)
    dense = {
        f"mtp.layers.0.mlp.{name}.weight": torch.randn(shape, generator=generator)
        for name, shape in (
            ("gate_proj", (256, 128)),
            ("up_proj", (256, 128)),
            ("down_proj", (128, 256)),
        )
    }
    dense["mtp.fc.weight"] = torch.randn(128, 256, generator=generator)
    weights = source / "model.safetensors"
    save_file({**load_file(weights), **dense}, weights, metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    spec = ARCHITECTURES["exaone_moe"]
    assert carry_mtp_layers(source, target, spec, config, 6, None) == {}
    after = _tensors(target)
    for name, tensor in dense.items():
        assert after[name].equal(tensor)
    index = json.loads((target / "model.safetensors.index.json").read_text())
    assert set(dense) <= set(index["weight_map"])
