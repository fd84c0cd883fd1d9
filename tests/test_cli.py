import json

import pytest
from transformers import AutoModelForCausalLM

from ream_modifiers.cli import SUMMARY_FILENAME, main
from ream_modifiers.saving import REPORT_FILENAME


def test_compress_writes_a_complete_checkpoint(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "calib.jsonl"
    data.write_text(
        "\n".join(json.dumps({"text": f"line {i} of some text"}) for i in range(20))
    )
    out = tmp_path / "out"
    code = main(
        [
            "compress",
            "aimer_w4a16",
            "--model",
            str(tiny_model_dir("qwen3_moe")),
            "--dataset",
            str(data),
            "--num-samples",
            "8",
            "--max-seq-len",
            "32",
            "--output",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "experts/layer    8 -> 6 (2 MoE layers)" in printed
    for name in (
        "config.json",
        "recipe.yaml",
        "tokenizer.json",
        REPORT_FILENAME,
        SUMMARY_FILENAME,
    ):
        assert (out / name).is_file(), name
    summary = json.loads((out / SUMMARY_FILENAME).read_text())
    assert summary["parameters_after"] < summary["parameters_before"]
    assert summary["gib_after"] < summary["gib_before"]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.model.layers[0].mlp.experts.gate_up_proj.shape[0] == 6


def test_failed_run_leaves_no_output(tiny_model_dir, tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("s_stage:\n  s_modifiers:\n    REAPModifier: {num_experts: 1}\n")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="top_k=2"):
        main(
            [
                "compress",
                str(recipe),
                "--model",
                str(tiny_model_dir("qwen3_moe")),
                "--dataset",
                "bundled",
                "--num-samples",
                "4",
                "--max-seq-len",
                "16",
                "--output",
                str(out),
            ]
        )
    assert list(tmp_path.iterdir()) == [recipe]


def test_unknown_recipe_and_existing_output(tmp_path):
    with pytest.raises(SystemExit, match="not found; known recipes"):
        main(
            [
                "compress",
                "nope",
                "--model",
                "m",
                "--dataset",
                "bundled",
                "--output",
                str(tmp_path / "o"),
            ]
        )
    with pytest.raises(SystemExit, match="exists; pass --overwrite"):
        main(
            [
                "compress",
                "reap_w4a16",
                "--model",
                "m",
                "--dataset",
                "bundled",
                "--output",
                str(tmp_path),
            ]
        )


def test_compress_with_a_calibration_mix(tiny_model_dir, tmp_path):
    code_dir = tmp_path / "code"
    code_dir.mkdir()
    (code_dir / "a.txt").write_text("def f(x):\n    return x * 2\n\n" * 20)
    out = tmp_path / "out"
    main(
        [
            "compress",
            "ream_w4a16",
            "--model",
            str(tiny_model_dir("qwen3_moe")),
            "--mix",
            "general=0.25,math=0.25,code=0.5",
            "--mix-source",
            "general=bundled:general",
            "--mix-source",
            "math=bundled:math",
            "--mix-source",
            f"code={code_dir}",
            "--num-samples",
            "8",
            "--max-seq-len",
            "32",
            "--output",
            str(out),
        ]
    )
    calibration = json.loads((out / "calibration.json").read_text())
    assert calibration["rows"] == {"code": 4, "general": 2, "math": 2}
    assert calibration["sources"]["code"] == str(code_dir)
    report = json.loads((out / REPORT_FILENAME).read_text())
    assert report[0]["method"] == "REAM"
    with pytest.raises(SystemExit, match="exactly one of --dataset and --mix"):
        main(
            ["compress", "ream_w4a16", "--model", "m", "--output", str(tmp_path / "x")]
        )
