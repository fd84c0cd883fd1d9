"""check_checkpoint on tiny checkpoints and deliberately broken copies."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from llmcompressor.core import reset_session
from safetensors.torch import load_file, save_file

from ream_modifiers.check import CheckpointCheckError, check_checkpoint
from ream_modifiers.cli import compress, main
from tests.check.editing import WEIGHTS, drop, edited


@pytest.fixture(scope="module")
def w4a16_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """qwen3_moe, AIMER 8 -> 6 experts, GPTQ W4A16 (pack-quantized)."""
    out = tmp_path_factory.mktemp("w4a16") / "out"
    reset_session()
    compress(
        "aimer_w4a16",
        str(tiny_model_dir("qwen3_moe")),
        "bundled",
        str(out),
        num_samples=4,
        max_seq_len=16,
    )
    reset_session()
    return out


@pytest.mark.parametrize(
    ("model_type", "first_layer"),
    [
        ("qwen3_moe", "model.layers.0.mlp"),
        ("mixtral", "model.layers.0.block_sparse_moe"),
        ("deepseek_v3", "model.layers.1.mlp"),
    ],
)
def test_unquantized_tiny_checkpoints_pass(tiny_model_dir, model_type, first_layer):
    report = check_checkpoint(tiny_model_dir(model_type))
    assert report.violations == []
    assert report.ok
    assert report.model_type == model_type
    assert report.experts_per_layer[first_layer] == 8
    assert len(report.experts_per_layer) == 2
    assert report.quantization_format is None


def test_w4a16_checkpoint_passes(w4a16_dir):
    report = check_checkpoint(w4a16_dir)
    assert report.violations == []
    assert report.experts_per_layer == {
        "model.layers.0.mlp": 6,
        "model.layers.1.mlp": 6,
    }
    assert report.quantization_format == "pack-quantized"
    assert report.summary().startswith(
        f"OK {w4a16_dir}: qwen3_moe, 2 MoE layers x 6 experts, pack-quantized"
    )


def test_one_expert_missing(w4a16_dir, tmp_path):
    broken = edited(
        w4a16_dir, tmp_path / "b", tensors=drop("model.layers.0.mlp.experts.3.")
    )
    report = check_checkpoint(broken)
    assert report.codes == ["missing-expert-tensors"]
    (violation,) = report.violations
    assert violation.where == "model.layers.0.mlp.experts.3"
    assert violation.message.startswith(
        "expert 3 of 6 has no tensors: "
        "model.layers.0.mlp.experts.3.down_proj.weight_packed, "
        "model.layers.0.mlp.experts.3.down_proj.weight_scale, "
        "model.layers.0.mlp.experts.3.down_proj.weight_shape, "
        "model.layers.0.mlp.experts.3.gate_proj.weight_packed"
    )
    with pytest.raises(CheckpointCheckError, match="expert 3 of 6 has no tensors"):
        report.raise_for_violations()


def test_one_projection_missing_under_hub_names(tiny_model_dir, tmp_path):
    """Mixtral's on-disk w1/w2/w3 names are reported as stored."""
    name = "model.layers.1.block_sparse_moe.experts.2.w3.weight"
    broken = edited(tiny_model_dir("mixtral"), tmp_path / "b", tensors=drop(name))
    report = check_checkpoint(broken)
    assert report.codes == ["missing-expert-tensors"]
    assert report.violations[0].where == "model.layers.1.block_sparse_moe.experts.2"
    assert report.violations[0].message.startswith(
        f"expert 2 of 8 lacks tensors: {name};"
    )


def _quantize_router(state: dict) -> None:
    weight = state.pop("model.layers.1.mlp.gate.weight")
    state["model.layers.1.mlp.gate.weight_packed"] = torch.zeros(
        weight.shape[0], weight.shape[1] // 8, dtype=torch.int32
    )
    state["model.layers.1.mlp.gate.weight_scale"] = torch.ones(weight.shape[0], 1)
    state["model.layers.1.mlp.gate.weight_shape"] = torch.tensor(weight.shape)


def _unignore_router(config: dict) -> None:
    config["quantization_config"]["ignore"].remove("model.layers.1.mlp.gate")


def test_quantized_router(w4a16_dir, tmp_path):
    broken = edited(
        w4a16_dir, tmp_path / "b", tensors=_quantize_router, config=_unignore_router
    )
    report = check_checkpoint(broken)
    assert report.codes == ["quantized-router", "router-not-ignored"]
    quantized, unlisted = report.violations
    assert quantized.where == "model.layers.1.mlp.gate.weight_packed"
    assert "router model.layers.1.mlp.gate is stored quantized" in quantized.message
    assert "'re:.*mlp.gate$'" in quantized.fix
    assert unlisted.where == "model.layers.1.mlp.gate"
    assert "add 'model.layers.1.mlp.gate'" in unlisted.fix


def test_router_missing_from_ignore(w4a16_dir, tmp_path):
    broken = edited(w4a16_dir, tmp_path / "b", config=_unignore_router)
    assert check_checkpoint(broken).codes == ["router-not-ignored"]


def test_a_router_pattern_in_ignore_covers_routers(w4a16_dir, tmp_path):
    def patterns(config: dict) -> None:
        config["quantization_config"]["ignore"] = ["lm_head", "re:.*mlp.gate$"]

    assert check_checkpoint(edited(w4a16_dir, tmp_path / "b", config=patterns)).ok


def test_wrong_count_in_config(w4a16_dir, tmp_path):
    def wrong(config: dict) -> None:
        config["num_experts"] = 8

    report = check_checkpoint(edited(w4a16_dir, tmp_path / "b", config=wrong))
    assert report.codes == ["config-count"]
    (violation,) = report.violations
    assert violation.where == "config.json num_experts"
    assert violation.message.startswith(
        "num_experts=8, but every MoE layer stores 6 experts"
    )
    assert violation.fix == "set num_experts, num_local_experts to 6"


def test_non_uniform_layers(tiny_model_dir, tmp_path):
    def shrink_layer0(state: dict) -> None:
        for index in (6, 7):
            drop(f"model.layers.0.mlp.experts.{index}.")(state)
        gate = "model.layers.0.mlp.gate.weight"
        state[gate] = state[gate][:6].contiguous()

    broken = edited(tiny_model_dir("qwen3_moe"), tmp_path / "b", shrink_layer0)
    report = check_checkpoint(broken)
    assert report.codes == ["non-uniform-experts"]
    assert report.violations[0].message.startswith(
        "MoE layers store different expert counts (model.layers.0.mlp: 6, "
        "model.layers.1.mlp: 8)"
    )


def test_router_and_bias_shapes(tiny_model_dir, tmp_path):
    def cut(state: dict) -> None:
        gate = "model.layers.1.mlp.gate.weight"
        state[gate] = state[gate][:7].contiguous()
        bias = "model.layers.2.mlp.gate.e_score_correction_bias"
        state[bias] = state[bias][:6].contiguous()

    report = check_checkpoint(
        edited(tiny_model_dir("deepseek_v3"), tmp_path / "b", cut)
    )
    assert report.codes == ["router-shape", "router-shape"]
    rows, bias = report.violations
    assert rows.where == "model.layers.1.mlp.gate.weight"
    assert rows.message == "router has 7 rows but the layer stores 8 experts"
    assert bias.where == "model.layers.2.mlp.gate.e_score_correction_bias"
    assert bias.message == "has 6 entries but the layer stores 8 experts"


def test_missing_correction_bias(tiny_model_dir, tmp_path):
    broken = edited(
        tiny_model_dir("deepseek_v3"),
        tmp_path / "b",
        drop("model.layers.1.mlp.gate.e_score_correction_bias"),
    )
    report = check_checkpoint(broken)
    assert report.codes == ["missing-correction-bias"]
    assert report.violations[0].where == (
        "model.layers.1.mlp.gate.e_score_correction_bias"
    )


@pytest.mark.parametrize(
    ("values", "code", "message"),
    [
        ({"n_group": 3}, "n-group", "n_group=3 does not divide the 8 experts"),
        ({"n_group": 8}, "n-group", "1 expert per group; the group score sums"),
        (
            {"num_experts_per_tok": 5},
            "top-k",
            "num_experts_per_tok=5, but with n_group=2 and topk_group=1 a token "
            "reaches only 4 of the 8 experts",
        ),
        ({"num_experts_per_tok": 9}, "top-k", "num_experts_per_tok=9 exceeds"),
    ],
)
def test_group_divisibility_and_reachable_top_k(
    tiny_model_dir, tmp_path, values, code, message
):
    broken = edited(
        tiny_model_dir("deepseek_v3"), tmp_path / "b", config=lambda c: c.update(values)
    )
    report = check_checkpoint(broken)
    assert code in report.codes
    assert any(v.message.startswith(message) for v in report.violations), report
    assert set(report.codes) <= {"n-group", "top-k"}


def test_packed_tensors_without_quantization_config(w4a16_dir, tmp_path):
    broken = edited(
        w4a16_dir, tmp_path / "b", config=lambda c: c.pop("quantization_config")
    )
    report = check_checkpoint(broken)
    assert report.codes == ["quantization-config-missing"]
    assert "config.json has no quantization_config" in report.violations[0].message


def test_quantized_module_listed_in_ignore(w4a16_dir, tmp_path):
    def ignore_q(config: dict) -> None:
        config["quantization_config"]["ignore"].append("re:.*self_attn.q_proj$")

    report = check_checkpoint(edited(w4a16_dir, tmp_path / "b", config=ignore_q))
    assert report.codes == ["ignored-but-quantized"] * 2
    assert [v.where for v in report.violations] == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.q_proj",
    ]


def test_quantized_module_lacking_its_scale(w4a16_dir, tmp_path):
    broken = edited(
        w4a16_dir, tmp_path / "b", drop("model.layers.0.self_attn.o_proj.weight_scale")
    )
    report = check_checkpoint(broken)
    assert report.codes == ["incomplete-quantized-tensors"]
    assert report.violations[0].message.startswith(
        "quantized as pack-quantized by config_groups.group_0 but lacks "
        "['weight_scale']"
    )


def test_config_says_quantized_but_experts_are_not(w4a16_dir, tiny_model_dir, tmp_path):
    quantization = json.loads((w4a16_dir / "config.json").read_text())[
        "quantization_config"
    ]
    broken = edited(
        tiny_model_dir("qwen3_moe"),
        tmp_path / "b",
        config=lambda c: c.update(quantization_config=quantization),
    )
    report = check_checkpoint(broken)
    assert report.codes == ["unquantized-experts"] * 2
    assert report.violations[0].message.startswith(
        "24 expert projections (e.g. model.layers.0.mlp.experts.0.down_proj) are "
        "targeted by config_groups.group_0 (pack-quantized) but stored unquantized"
    )


def test_sharded_checkpoint_with_index(tiny_model_dir, tmp_path):
    target = shutil.copytree(tiny_model_dir("qwen3_moe"), tmp_path / "sharded")
    state = load_file(target / WEIGHTS)
    (target / WEIGHTS).unlink()
    names = sorted(state)
    shards = {"a.safetensors": names[::2], "b.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: state[k] for k in keys}, target / file, {"format": "pt"})
    index = {"weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (target / "model.safetensors.index.json").write_text(json.dumps(index))
    assert check_checkpoint(target).ok
    (target / "b.safetensors").unlink()
    report = check_checkpoint(target)
    assert report.codes[0] == "missing-shard"
    assert report.violations[0].message == (
        "model.safetensors.index.json lists b.safetensors, which does not exist"
    )


def test_fused_expert_tensors(tiny_model_dir, tmp_path):
    def fuse(state: dict) -> None:
        for layer in (0, 1):
            drop(f"model.layers.{layer}.mlp.experts.")(state)
            state[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.zeros(1)

    report = check_checkpoint(edited(tiny_model_dir("qwen3_moe"), tmp_path / "b", fuse))
    assert report.codes == ["fused-experts"]
    assert report.violations[0].where == "model.layers.0.mlp.experts.gate_up_proj"


def test_cli_check_exit_codes(w4a16_dir, tmp_path, capsys):
    assert main(["check", str(w4a16_dir)]) == 0
    assert capsys.readouterr().out.startswith(f"OK {w4a16_dir}")
    broken = edited(
        w4a16_dir, tmp_path / "b", config=lambda c: c.update(num_local_experts=5)
    )
    assert main(["check", str(broken)]) == 1
    err = capsys.readouterr().err
    assert "FAILED" in err
    assert "[config-count] config.json num_local_experts: num_local_experts=5" in err
    assert "fix: set num_experts, num_local_experts to 6" in err


def test_expert_of_another_width(tiny_model_dir, tmp_path):
    def narrow(state: dict) -> None:
        name = "model.layers.1.mlp.experts.4.down_proj.weight"
        state[name] = state[name][:, :64].contiguous()

    report = check_checkpoint(
        edited(tiny_model_dir("qwen3_moe"), tmp_path / "b", narrow)
    )
    assert report.codes == ["expert-shape", "expert-width"]
    violation = report.violations[0]
    assert violation.where == "model.layers.1.mlp.experts.4.down_proj.weight"
    assert violation.message.startswith(
        "1 down_proj.weight tensor(s) differ from the common shape [128, 128] "
        "(this one is [128, 64])"
    )


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral", "gpt_oss"])
def test_experts_narrower_than_the_config(tiny_model_dir, tmp_path, model_type):
    """Uniform among themselves, but not what vLLM allocates from config.json."""
    from ream_modifiers.moe.architectures import ARCHITECTURES

    key = ARCHITECTURES[model_type].intermediate_size_key

    def wider_config(config: dict) -> None:
        config[key] = 2 * config[key]

    path = edited(tiny_model_dir(model_type), tmp_path / "b", config=wider_config)
    report = check_checkpoint(path)
    assert set(report.codes) == {"expert-width"}
    assert len(report.violations) == 2  # one per MoE layer
    assert f"({key}=" in report.violations[0].message


def test_a_bias_vllm_does_not_create(tiny_model_dir, tmp_path):
    """DeepSeek-V3 without noaux_tc: vLLM has no parameter for the stored bias."""
    path = edited(
        tiny_model_dir("deepseek_v3"),
        tmp_path / "b",
        config=lambda c: c.update(topk_method="greedy"),
    )
    report = check_checkpoint(path)
    assert report.codes == ["unexpected-correction-bias"] * 2
    assert "topk_method='noaux_tc'" in report.violations[0].message


def test_dots1_always_needs_its_bias(tiny_model_dir, tmp_path):
    """vLLM serves dots1 through transformers' class, whose router has the bias."""
    path = edited(
        tiny_model_dir("dots1"),
        tmp_path / "b",
        drop("model.layers.1.mlp.gate.e_score_correction_bias"),
        config=lambda c: c.update(topk_method="greedy"),
    )
    report = check_checkpoint(path)
    assert report.codes == ["missing-correction-bias"]
    assert "vLLM always creates" in report.violations[0].message


def test_a_truncated_shard_is_a_violation_not_a_crash(tiny_model_dir, tmp_path):
    """The checker reads headers itself (no torch); a cut file is reported."""
    copy = Path(shutil.copytree(tiny_model_dir("qwen3_moe"), tmp_path / "cut"))
    weights = copy / WEIGHTS
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    report = check_checkpoint(copy)
    assert not report.ok
    violation = next(v for v in report.violations if v.code == "unreadable-shard")
    assert violation.where == WEIGHTS
    assert "is truncated" in violation.message
