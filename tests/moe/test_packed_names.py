"""
Quantized gpt-oss experts under the names vLLM reads (``w13``/``w2``), and the
checker rules that would have caught the per-projection names vLLM skips.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from llmcompressor.core import reset_session
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ream_modifiers import saving
from ream_modifiers.check import check_checkpoint
from ream_modifiers.cli import compress
from ream_modifiers.moe.architectures import ARCHITECTURES
from ream_modifiers.moe.packed_names import PackedNamesError, write_packed_names
from tests.check.editing import WEIGHTS, edited

SPEC = ARCHITECTURES["gpt_oss"]
EXPERT = "model.layers.0.mlp.experts.0"


def _oneshot(tiny_model_dir, out: Path) -> Path:
    """gpt-oss, AIMER 8 -> 6 experts, GPTQ W4A16 (deterministic), saved."""
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoTokenizer

    from ream_modifiers import AIMERModifier
    from ream_modifiers.data import build_calibration_dataset
    from ream_modifiers.moe import load_moe_model

    path = tiny_model_dir("gpt_oss")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = load_moe_model(path, dtype=torch.float32)
    reset_session()
    oneshot(
        model=model,
        dataset=build_calibration_dataset("bundled", tokenizer, 4, 16),
        recipe=[
            AIMERModifier(sparsity=0.25),
            GPTQModifier(targets=["Linear"], scheme="W4A16", ignore=["lm_head"]),
        ],
        processor=tokenizer,
        num_calibration_samples=4,
        max_seq_length=16,
    )
    model.save_pretrained(out)
    reset_session()
    return out


@pytest.fixture(scope="module")
def per_projection(tiny_model_dir, tmp_path_factory) -> Path:
    """As llm-compressor alone saves it (the layout vLLM skips)."""
    patch = pytest.MonkeyPatch()
    patch.setattr(saving, "write_packed_names", lambda *args: 0)
    try:
        return _oneshot(tiny_model_dir, tmp_path_factory.mktemp("plain") / "out")
    finally:
        patch.undo()


@pytest.fixture(scope="module")
def packed(per_projection, tmp_path_factory) -> Path:
    """The same tensors rewritten as the package's save does."""
    out = shutil.copytree(per_projection, tmp_path_factory.mktemp("packed") / "out")
    assert write_packed_names(out, SPEC) == 2 * 6 * 6
    return out


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in directory.glob("*.safetensors"):
        out.update(load_file(file))
    return out


def test_the_cli_publishes_the_names_vllm_streams(tiny_model_dir, tmp_path):
    """ream-compress checks before publishing: the checker accepts them."""
    out = tmp_path / "out"
    reset_session()
    compress(
        "aimer_w4a16", str(tiny_model_dir("gpt_oss")), "bundled", str(out),
        num_samples=4, max_seq_len=16,
    )  # fmt: skip
    reset_session()
    assert f"{EXPERT}.w13_weight_packed" in _tensors(out)


def test_the_save_hook_writes_them(tiny_model_dir, tmp_path):
    names = set(_tensors(_oneshot(tiny_model_dir, tmp_path / "out")))
    assert f"{EXPERT}.w13_weight_packed" in names
    assert f"{EXPERT}.gate_proj.weight_packed" not in names


def test_saved_names_are_the_ones_vllm_streams(packed):
    names = set(_tensors(packed))
    expert = sorted(n.removeprefix(f"{EXPERT}.") for n in names if f"{EXPERT}." in n)
    assert expert == [
        "w13_bias",
        "w13_weight_packed",
        "w13_weight_scale",
        "w2_bias",
        "w2_weight_packed",
        "w2_weight_scale",
    ]
    assert not [n for n in names if "_proj." in n and ".experts." in n]
    report = check_checkpoint(packed)
    assert report.violations == [], report.summary()
    assert set(report.experts_per_layer.values()) == {6}


def test_w13_rows_interleave_gate_and_up(packed, per_projection):
    new, old = _tensors(packed), _tensors(per_projection)
    for layer in range(2):
        for index in range(6):
            expert = f"model.layers.{layer}.mlp.experts.{index}"
            for param in ("weight_packed", "weight_scale", "bias"):
                w13 = new[f"{expert}.w13_{param}"]
                assert torch.equal(w13[0::2], old[f"{expert}.gate_proj.{param}"])
                assert torch.equal(w13[1::2], old[f"{expert}.up_proj.{param}"])
                assert torch.equal(
                    new[f"{expert}.w2_{param}"], old[f"{expert}.down_proj.{param}"]
                )
    assert f"{EXPERT}.gate_proj.weight_shape" in old


def test_rewrite_across_shards_matches_a_single_file(packed, per_projection, tmp_path):
    """gate in one shard, its up in the other: the index follows every move."""
    state = _tensors(per_projection)
    second = {n for n in state if ".up_proj." in n or ".layers.1." in n}
    sharded = shutil.copytree(per_projection, tmp_path / "sharded")
    (sharded / WEIGHTS).unlink()
    files = {
        "model-00001-of-00002.safetensors": {},
        "model-00002-of-00002.safetensors": {},
    }
    first_file, second_file = files
    for name, tensor in state.items():
        files[second_file if name in second else first_file][name] = tensor
    for file, tensors in files.items():
        save_file(tensors, sharded / file, metadata={"format": "pt"})
    index = {n: second_file if n in second else first_file for n in state}
    (sharded / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": index})
    )
    written = write_packed_names(sharded, SPEC)
    assert written == 2 * 6 * 6  # layers x experts x (w13, w2) x 3 params
    rewritten = _tensors(sharded)
    expected = _tensors(packed)
    assert rewritten.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(rewritten[name], tensor), name
    weight_map = json.loads((sharded / "model.safetensors.index.json").read_text())
    for name, file in weight_map["weight_map"].items():
        with safe_open(sharded / file, "pt") as handle:
            assert name in handle.keys(), name
    assert check_checkpoint(sharded).violations == []


def test_a_zero_point_is_refused_before_any_file_changes(per_projection, tmp_path):
    def add_zero_point(state: dict) -> None:
        state[f"{EXPERT}.gate_proj.weight_zero_point"] = torch.zeros(
            8, 1, dtype=torch.int32
        )

    copy = edited(per_projection, tmp_path / "asym", tensors=add_zero_point)
    before = (copy / WEIGHTS).read_bytes()
    with pytest.raises(PackedNamesError, match="weight_zero_point.*symmetric"):
        write_packed_names(copy, SPEC)
    assert (copy / WEIGHTS).read_bytes() == before


def test_checker_rejects_the_per_projection_layout(per_projection):
    report = check_checkpoint(per_projection)
    assert [v.code for v in report.violations] == ["unread-expert-names"] * 2
    message = report.violations[0].message
    assert "experts.{i}.w13_{weight_packed,weight_scale,bias}" in message
    assert "uninitialised" in message
    assert "write_packed_names" in report.violations[0].fix


def test_checker_rejects_a_weight_shape_vllm_cannot_load(packed, tmp_path):
    def add_shape(state: dict) -> None:
        for name in [n for n in state if n.endswith(".w13_weight_packed")]:
            state[name.replace("_packed", "_shape")] = torch.tensor([256, 128])

    report = check_checkpoint(edited(packed, tmp_path / "shape", tensors=add_shape))
    assert [v.code for v in report.violations] == ["unloadable-expert-tensor"] * 2
    assert report.violations[0].where == f"{EXPERT}.w13_weight_shape"


def test_checker_wants_the_expert_biases(packed, tmp_path):
    def drop_bias(state: dict) -> None:
        for name in [n for n in state if n.endswith(".w2_bias")]:
            del state[name]

    report = check_checkpoint(edited(packed, tmp_path / "nobias", tensors=drop_bias))
    assert {v.code for v in report.violations} == {"missing-expert-tensors"}
    assert report.violations[0].where.endswith(".w2_bias")


def test_transformers_reloads_the_packed_names_as_the_model_ran(packed, per_projection):
    """
    Both layouts dequantize to the same fused gpt-oss experts: ours through
    DequantizeInt4Experts, llm-compressor's through transformers' own
    compressed-tensors decompression.
    """
    from transformers import AutoModelForCausalLM

    from ream_modifiers.moe.conversions import per_expert_checkpoints

    ids = torch.tensor([[5, 17, 99, 3, 250, 41]])
    logits = []
    for directory in (packed, per_projection):
        with per_expert_checkpoints("gpt_oss"):
            model, info = AutoModelForCausalLM.from_pretrained(
                directory, dtype=torch.float32, output_loading_info=True
            )
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        with torch.no_grad():
            logits.append(model(ids).logits)
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=0)
