"""
A vision-language MoE through ream-compress: only the language model's experts
change; the vision tower is saved bit-identical and unquantized, with the
processor files vLLM needs, and the checker notices when either goes missing.
"""

import json
from pathlib import Path

import pytest
from llmcompressor.core import reset_session
from safetensors import safe_open

from ream_modifiers.check import check_checkpoint
from ream_modifiers.check.multimodal import VISION_MARKERS
from ream_modifiers.cli import compress
from ream_modifiers.moe.architectures import ARCHITECTURES, text_config_entry
from ream_modifiers.processor_files import copy_processor_files
from tests.check.editing import drop, edited

FAMILIES = (
    "qwen3_vl_moe",
    "qwen3_5_moe",
    "glm4v_moe",
    "kimi_k25",
    "llama4",
    "qwen3_omni_moe",
    "ernie4_5_vl_moe",
)
# where each family keeps its vision tower, and its projector (merger)
TOWERS = {
    "qwen3_vl_moe": ("model.visual.", ".merger."),
    "qwen3_5_moe": ("model.visual.", ".merger."),
    "glm4v_moe": ("model.visual.", ".merger."),
    "kimi_k25": ("vision_tower.", "mm_projector."),
    "llama4": ("vision_model.", "multi_modal_projector."),
    "qwen3_omni_moe": ("thinker.visual.", ".merger."),
    "ernie4_5_vl_moe": ("vision_model.", ".attn.qkv"),
}


def _tensors(directory: Path) -> dict:
    tensors = {}
    for shard in sorted(directory.glob("*.safetensors")):
        with safe_open(shard, "pt") as handle:
            tensors.update({name: handle.get_tensor(name) for name in handle.keys()})
    return tensors


def _vision(tensors: dict) -> dict:
    return {
        name: tensor
        for name, tensor in tensors.items()
        # Kimi-K2.5's projector sits beside its tower
        if any(
            marker in name
            for marker in (*VISION_MARKERS, "mm_projector.", "multi_modal_projector.")
        )
    }


@pytest.fixture(scope="module", params=FAMILIES)
def compressed(request, tiny_model_dir, tmp_path_factory) -> tuple[Path, Path]:
    """A tiny vision-language MoE and its REAP 8 -> 6 + GPTQ W4A16 output."""
    source = tiny_model_dir(request.param)
    out = tmp_path_factory.mktemp("vl") / "out"
    reset_session()
    compress(
        "reap_w4a16", str(source), "bundled", str(out), num_samples=4, max_seq_len=16
    )
    reset_session()
    return source, out


def _family(out: Path) -> str:
    return json.loads((out / "config.json").read_text())["model_type"]


def test_vision_tower_saved_bit_identical_and_unquantized(compressed):
    source, out = compressed
    before, after = _vision(_tensors(source)), _vision(_tensors(out))
    assert len(before) > 20  # patch embed, 2 blocks, merger/projector
    assert sorted(after) == sorted(before)  # no weight_packed/scale companions
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype, name
        assert after[name].equal(tensor), name
    # every vision Linear is listed as ignored, so vLLM builds it unquantized
    quantization = json.loads((out / "config.json").read_text())["quantization_config"]
    linears = {
        n.removesuffix(".weight")
        for n, t in before.items()
        if t.ndim == 2 and "embed" not in n
    }
    assert any(TOWERS[_family(out)][1] in name for name in linears)
    assert linears <= set(quantization["ignore"])


def test_language_model_experts_reduced_and_quantized(compressed):
    _, out = compressed
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] in FAMILIES
    spec = ARCHITECTURES[config["model_type"]]
    text, path = text_config_entry(config)
    assert text[spec.num_experts_key] == 6
    assert "vision_config" in (
        config["thinker_config"] if "thinker" in path else config
    )
    report = check_checkpoint(out)
    assert report.violations == []
    # two MoE layers of 6 (GLM-4.5V's and Kimi-K2.5's first layer is dense),
    # ERNIE-4.5-VL's with two expert sets each
    sets = spec.sets_per_layer
    assert list(report.experts_per_layer.values()) == [6] * 2 * sets
    first = next(iter(report.experts_per_layer)).removesuffix(".text_moe")
    # Kimi-K2.5's hub (and vLLM) names put the language model first
    assert first.startswith(
        (
            "model.language_model.layers.",
            "language_model.model.",
            "thinker.model.",
            "model.layers.",
        )
    )
    names = _tensors(out)
    assert f"{first}.experts.5.down_proj.weight_packed" in names
    assert f"{first}.experts.{6 * sets}.down_proj.weight_packed" not in names


def test_images_that_do_not_fit_a_row_leave_calibration_text_only(compressed):
    _, out = compressed
    calibration = json.loads((out / "calibration.json").read_text())
    assert "images" not in calibration  # 16-token rows; an image takes 18


def test_processor_config_copied_from_the_source(compressed):
    source, out = compressed
    assert (out / "preprocessor_config.json").read_bytes() == (
        source / "preprocessor_config.json"
    ).read_bytes()


def test_checker_flags_missing_vision_weights_and_processor(compressed, tmp_path):
    _, out = compressed
    broken = edited(out, tmp_path / "b", tensors=drop(TOWERS[_family(out)][0]))
    (broken / "preprocessor_config.json").unlink()
    report = check_checkpoint(broken)
    assert report.codes == ["no-vision-weights", "no-preprocessor-config"]
    family = json.loads((out / "config.json").read_text())["model_type"]
    assert f"describes a vision tower ({family})" in report.violations[0].message


def test_copy_processor_files_keeps_what_the_save_wrote(tmp_path):
    source, target = tmp_path / "source", tmp_path / "target"
    source.mkdir()
    target.mkdir()
    (source / "preprocessor_config.json").write_text("{}")
    (source / "chat_template.jinja").write_text("source")
    (target / "chat_template.jinja").write_text("saved")
    assert copy_processor_files(str(source), target) == ["preprocessor_config.json"]
    assert (target / "chat_template.jinja").read_text() == "saved"
    assert (target / "preprocessor_config.json").read_text() == "{}"
