"""
check_checkpoint on every family's tiny checkpoint: the on-disk layout, router,
bias, count and group rules come from the family's architecture row.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from ream_modifiers.check import check_checkpoint
from ream_modifiers.moe.architectures import ARCHITECTURES
from ream_modifiers.tiny import TINY_CONFIGS
from tests.check.editing import drop, edited

# a pack-quantized W4A16 config that targets every Linear, ignoring only lm_head
W4A16 = {
    "quant_method": "compressed-tensors",
    "format": "pack-quantized",
    "config_groups": {
        "group_0": {
            "targets": ["Linear"],
            "weights": {
                "num_bits": 4,
                "type": "int",
                "symmetric": True,
                "strategy": "group",
                "group_size": 128,
            },
        }
    },
    "ignore": ["lm_head"],
}
GPT_OSS_FUSED = ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")


def _slice(prefix: str, names: tuple[str, ...], keep: int) -> Callable[[dict], None]:
    """Keep the first ``keep`` entries of the last dim of ``prefix + name``."""

    def edit(state: dict) -> None:
        for name in names:
            state[prefix + name] = state[prefix + name][..., :keep].contiguous()

    return edit


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_every_family_passes_with_its_layout(tiny_model_dir, model_type):
    report = check_checkpoint(tiny_model_dir(model_type))
    assert report.violations == [], report.summary()
    assert report.model_type == model_type
    sets = ARCHITECTURES[model_type].sets_per_layer  # ERNIE-4.5-VL: 2
    assert sorted(report.experts_per_layer.values()) == [8] * 2 * sets


def test_gpt_oss_fused_hub_layout_is_the_rows_layout(tiny_model_dir):
    assert ARCHITECTURES["gpt_oss"].fused_experts == GPT_OSS_FUSED
    assert not ARCHITECTURES["qwen3_moe"].fused_experts
    report = check_checkpoint(tiny_model_dir("gpt_oss"))
    assert report.experts_per_layer == {
        "model.layers.0.mlp": 8,
        "model.layers.1.mlp": 8,
    }


def test_gpt_oss_fused_tensor_missing(tiny_model_dir, tmp_path):
    name = "model.layers.1.mlp.experts.down_proj_bias"
    report = check_checkpoint(
        edited(tiny_model_dir("gpt_oss"), tmp_path / "b", drop(name))
    )
    assert report.codes == ["missing-expert-tensors"]
    assert report.violations[0].where == name


def test_gpt_oss_expert_count_comes_from_the_fused_tensors(tiny_model_dir, tmp_path):
    def prune_layer0(state: dict) -> None:
        prefix = "model.layers.0.mlp."
        for name in [*(f"experts.{n}" for n in GPT_OSS_FUSED), "router.weight"]:
            state[prefix + name] = state[prefix + name][:6].contiguous()
        state[prefix + "router.bias"] = state[prefix + "router.bias"][:6].contiguous()

    report = check_checkpoint(
        edited(tiny_model_dir("gpt_oss"), tmp_path / "b", prune_layer0)
    )
    assert report.codes == ["non-uniform-experts"]
    assert report.experts_per_layer == {
        "model.layers.0.mlp": 6,
        "model.layers.1.mlp": 8,
    }


def test_gpt_oss_fused_tensor_with_another_expert_count(tiny_model_dir, tmp_path):
    name = "model.layers.1.mlp.experts.gate_up_proj_bias"

    def cut(state: dict) -> None:
        state[name] = state[name][:7].contiguous()

    report = check_checkpoint(edited(tiny_model_dir("gpt_oss"), tmp_path / "b", cut))
    assert report.codes == ["expert-shape"]
    assert report.violations[0].where == name
    assert report.violations[0].message == (
        "stores 7 experts along dim 0, the layer's other fused tensors 8"
    )


def test_gpt_oss_fused_tensor_outside_the_layout(tiny_model_dir, tmp_path):
    def add_blocks(state: dict) -> None:
        state["model.layers.0.mlp.experts.gate_up_proj_blocks"] = torch.zeros(8, 1)

    report = check_checkpoint(
        edited(tiny_model_dir("gpt_oss"), tmp_path / "b", add_blocks)
    )
    assert report.codes == ["fused-experts"]
    assert report.violations[0].where == (
        "model.layers.0.mlp.experts.gate_up_proj_blocks"
    )
    assert "gpt_oss stores its experts fused only as experts.gate_up_proj, " in (
        report.violations[0].message
    )


def _unfuse(state: dict) -> None:
    """gpt-oss's fused experts rewritten as unquantized per-expert tensors."""
    for layer in (0, 1):
        prefix = f"model.layers.{layer}.mlp.experts."
        gate_up = state.pop(prefix + "gate_up_proj")  # [E, H, 2I], interleaved
        gate_up_bias = state.pop(prefix + "gate_up_proj_bias")
        down = state.pop(prefix + "down_proj")  # [E, I, H]
        down_bias = state.pop(prefix + "down_proj_bias")
        for e in range(gate_up.shape[0]):
            for proj, start in (("gate_proj", 0), ("up_proj", 1)):
                cols = slice(start, None, 2)
                state[f"{prefix}{e}.{proj}.weight"] = gate_up[e][:, cols].T.contiguous()
                state[f"{prefix}{e}.{proj}.bias"] = gate_up_bias[e][cols].clone()
            state[f"{prefix}{e}.down_proj.weight"] = down[e].T.contiguous()
            state[f"{prefix}{e}.down_proj.bias"] = down_bias[e].clone()


def test_gpt_oss_unquantized_per_expert_is_flagged(tiny_model_dir, tmp_path):
    report = check_checkpoint(
        edited(tiny_model_dir("gpt_oss"), tmp_path / "b", _unfuse)
    )
    assert report.codes == ["unfused-experts"] * 2
    assert report.violations[0].where == "model.layers.0.mlp.experts"
    assert report.experts_per_layer == {
        "model.layers.0.mlp": 8,
        "model.layers.1.mlp": 8,
    }


def test_gpt_oss_mixed_layout(tiny_model_dir, tmp_path):
    def add_one(state: dict) -> None:
        state["model.layers.0.mlp.experts.0.gate_proj.weight"] = torch.zeros(4, 4)

    report = check_checkpoint(
        edited(tiny_model_dir("gpt_oss"), tmp_path / "b", add_one)
    )
    assert "mixed-expert-layout" in report.codes
    mixed = report.violations[report.codes.index("mixed-expert-layout")]
    assert mixed.where == "model.layers.0.mlp.experts"


# family: (its first MoE layer's stored correction bias, config values under
# which vLLM does not create it, or None where it always does)
BIASES = {
    "ernie4_5_moe": ("model.layers.1.mlp.moe_statics.e_score_correction_bias", None),
    "glm4_moe": ("model.layers.1.mlp.gate.e_score_correction_bias", None),
    "minimax_m2": (
        "model.layers.0.block_sparse_moe.e_score_correction_bias",
        {"use_routing_bias": False},
    ),
    # vLLM serves dots1 through transformers' class, whose router has the bias
    "dots1": ("model.layers.1.mlp.gate.e_score_correction_bias", None),
}


@pytest.mark.parametrize("model_type", sorted(BIASES))
def test_correction_bias_required_per_row(tiny_model_dir, tmp_path, model_type):
    name, optional = BIASES[model_type]
    without = edited(tiny_model_dir(model_type), tmp_path / "without", drop(name))
    report = check_checkpoint(without)
    assert report.codes == ["missing-correction-bias"]
    assert report.violations[0].where == name
    if optional is not None:
        # without the config switch vLLM has no parameter for any layer's bias
        suffix = name.rsplit(".", 1)[-1]

        def drop_all(state: dict) -> None:
            for key in [k for k in state if k.endswith(suffix)]:
                del state[key]

        relaxed = edited(
            tiny_model_dir(model_type),
            tmp_path / "optional",
            drop_all,
            config=lambda c: c.update(optional),
        )
        assert check_checkpoint(relaxed).ok


@pytest.mark.parametrize("model_type", sorted(BIASES))
def test_correction_bias_sliced_with_the_experts(tiny_model_dir, tmp_path, model_type):
    name, _ = BIASES[model_type]
    report = check_checkpoint(
        edited(tiny_model_dir(model_type), tmp_path / "b", _slice(name, ("",), 7))
    )
    assert report.codes == ["router-shape"]
    assert report.violations[0].where == name
    assert report.violations[0].message == (
        "has 7 entries but the layer stores 8 experts"
    )


def test_ernie_bias_keeps_its_leading_dim(tiny_model_dir, tmp_path):
    name, _ = BIASES["ernie4_5_moe"]

    def flatten(state: dict) -> None:
        state[name] = state[name].reshape(-1).contiguous()

    report = check_checkpoint(
        edited(tiny_model_dir("ernie4_5_moe"), tmp_path / "b", flatten)
    )
    assert report.codes == ["router-shape"]
    assert report.violations[0].message == (
        "has shape [8]; ernie4_5_moe stores it as [1, 8]"
    )


def test_hunyuan_router_rows_at_gate_wg(tiny_model_dir, tmp_path):
    name = "model.layers.1.mlp.gate.wg.weight"

    def cut(state: dict) -> None:
        state[name] = state[name][:7].contiguous()

    report = check_checkpoint(
        edited(tiny_model_dir("hunyuan_v1_moe"), tmp_path / "b", cut)
    )
    assert report.codes == ["router-shape"]
    assert report.violations[0].where == name


@pytest.mark.parametrize(
    ("values", "codes"),
    [
        # vLLM groups whenever n_group > 1, whatever topk_method says
        # (models/deepseek_v2.py: use_grouped_topk=True with the config's n_group)
        ({"n_group": 3, "topk_method": "greedy"}, ["n-group"]),
        ({"n_group": 3}, ["n-group"]),
        # a group scores by its best expert: one expert per group is fine
        ({"n_group": 8, "topk_group": 2}, []),
        ({"n_group": 8, "topk_group": 1}, ["top-k"]),
    ],
)
def test_deepseek_v2_group_rules(tiny_model_dir, tmp_path, values, codes):
    assert check_checkpoint(tiny_model_dir("deepseek_v2")).ok
    broken = edited(
        tiny_model_dir("deepseek_v2"), tmp_path / "b", config=lambda c: c.update(values)
    )
    assert check_checkpoint(broken).codes == codes


def test_deepseek_v3_one_expert_per_group_is_flagged(tiny_model_dir, tmp_path):
    """The same config that DeepSeek-V2 accepts: V3 scores a group by its top 2."""
    values = {"n_group": 8, "topk_group": 2}
    broken = edited(
        tiny_model_dir("deepseek_v3"), tmp_path / "b", config=lambda c: c.update(values)
    )
    assert check_checkpoint(broken).codes == ["n-group"]


@pytest.mark.parametrize(
    ("model_type", "router", "pattern"),
    [
        ("hunyuan_v1_moe", "model.layers.0.mlp.gate.wg", "re:.*mlp.gate.wg$"),
        (
            "mixtral",
            "model.layers.0.block_sparse_moe.gate",
            "re:.*block_sparse_moe.gate$",
        ),
        ("gpt_oss", "model.layers.0.mlp.router", "re:.*mlp.router$"),
    ],
)
def test_router_ignore_pattern_is_the_rows(
    tiny_model_dir, tmp_path, model_type, router, pattern
):
    """
    A quantization config that does not ignore the routers: the fix names the
    row's pattern for the stored router, and that pattern clears the problem.
    """
    source = tiny_model_dir(model_type)
    quantized = edited(
        source, tmp_path / "q", config=lambda c: c.update(quantization_config=W4A16)
    )
    report = check_checkpoint(quantized)
    unlisted = [v for v in report.violations if v.code == "router-not-ignored"]
    assert [v.where for v in unlisted] == [router, router.replace(".0.", ".1.", 1)]
    assert f"(or {pattern!r})" in unlisted[0].fix
    # the experts are stored unquantized (gpt-oss: fused) under a Linear target
    assert set(report.codes) == {"router-not-ignored", "unquantized-experts"}

    def ignore(config: dict) -> None:
        config["quantization_config"]["ignore"].append(pattern)

    assert (
        "router-not-ignored"
        not in check_checkpoint(
            edited(quantized, tmp_path / "ignored", config=ignore)
        ).codes
    )
