"""Bad model paths are refused before anything loads: exit 2, error and fix."""

from __future__ import annotations

import pytest

from ream_modifiers.cli import main
from ream_modifiers.errors import InputError, check_model_source
from tests.helpers import refused


def _compress(model: str, out) -> list[str]:
    return ["compress", "reap_w4a16", "--model", model, "--dataset", "bundled",
            "--output", str(out)]  # fmt: skip


@pytest.mark.parametrize(
    ("make", "named"),
    [
        (lambda tmp: str(tmp / "missing"), "does not exist"),
        (lambda tmp: "./not/here", "does not exist"),
        (lambda tmp: str((tmp / "empty").mkdir() or tmp / "empty"), "no config.json"),
    ],
)
def test_bad_model_path(tmp_path, capsys, make, named):
    model = make(tmp_path)
    refusal = refused(capsys, _compress(model, tmp_path / "out"))
    assert refusal.error == f"model directory {model} " + (
        "does not exist" if named == "does not exist" else "has no config.json"
    )
    assert not (tmp_path / "out").exists()


def test_hub_ids_are_left_to_the_hub():
    check_model_source("Qwen/Qwen3-30B-A3B")  # no local check, no error
    check_model_source("gpt2")
    with pytest.raises(InputError, match="does not exist"):
        check_model_source("/abs/path/model")


def test_group_size_that_does_not_divide_a_layer_is_refused_before_calibration(
    tmp_path, capsys, no_calibration
):
    """DeepSeek-V3's kv_b_proj reads the kv_lora_rank-wide latent (here 32)."""
    from ream_modifiers.tiny import build_tiny_moe

    model = build_tiny_moe("deepseek_v3", tmp_path / "m", kv_lora_rank=32)
    out = tmp_path / "out"
    refusal = refused(capsys, _compress(str(model), out))
    assert refusal.error == (
        "GPTQModifier: group_size 128 does not divide the input width of 3 "
        "targeted Linear layer(s), e.g. model.layers.0.self_attn.kv_b_proj (32 wide)"
    )
    assert "'re:.*self_attn.kv_b_proj$'" in refusal.fix
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_debug_adds_the_traceback_to_a_refusal(tmp_path, capsys):
    missing = str(tmp_path / "missing")
    assert main([*_compress(missing, tmp_path / "out"), "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert f"error: model directory {missing} does not exist\nfix: " in err
    assert not (tmp_path / "out").exists()
