"""``ream-compress calibrate`` and ``compress --from-stats / --budget``."""

import json

import yaml

from ream_modifiers.cli import main
from ream_modifiers.observe.stats_file import MANIFEST
from tests.helpers import refused

REAP_ONLY = {"reap_stage": {"reap_modifiers": {"REAPModifier": {"sparsity": 0.25}}}}


def _calibrate(model, stats) -> list[str]:
    return [
        "calibrate",
        "--model",
        str(model),
        "--dataset",
        "bundled",
        "--num-samples",
        "8",
        "--max-seq-len",
        "32",
        "--output",
        str(stats),
        "--methods",
        "reap",
        "ream",
        "--method-settings",
        '{"ream": {"max_activation_tokens": 64}}',
    ]


def test_calibrate_once_then_compress_without_data(tiny_model_dir, tmp_path, capsys):
    model, stats = tiny_model_dir("qwen3_moe"), tmp_path / "stats"
    assert main(_calibrate(model, stats)) == 0
    assert "--from-stats" in capsys.readouterr().out  # the next command
    manifest = json.loads((stats / MANIFEST).read_text())
    assert manifest["mode"] == "original"
    assert manifest["recorded_by"]["settings"]["methods"] == {
        "reap": {},
        "ream": {"max_activation_tokens": 64},
    }
    assert not stats.with_name("stats.partial").exists()

    recipe = tmp_path / "reap.yaml"
    recipe.write_text(yaml.safe_dump(REAP_ONLY))
    for budget in ("uniform", "saliency_fraction"):
        out = tmp_path / budget
        argv = ["compress", str(recipe), "--model", str(model), "--output", str(out)]
        assert main([*argv, "--from-stats", str(stats), "--budget", budget]) == 0
        report = json.loads((out / "expert_reduction.json").read_text())[-1]
        assert report["statistics_from"]["mode"] == "original"
        assert report["settings"]["budget"] == budget
        calibration = json.loads((out / "calibration.json").read_text())
        assert calibration == {"from_statistics": str(stats)}
        assert "from_statistics" in (out / "recipe.yaml").read_text()
    # 12 of 16 experts kept either way
    kept = report["budget"]["kept_per_layer"]
    assert sum(kept) == 12


def test_statistics_options_fail_before_loading(tiny_model_dir, tmp_path, capsys):
    model = tiny_model_dir("qwen3_moe")
    base = ["compress", "reap_w4a16", "--model", str(model), "--output"]
    out = str(tmp_path / "out")
    problem = refused(capsys, [*base, out, "--budget", "saliency_mass"])
    assert "needs every layer's statistics" in problem.error
    assert "ream-compress calibrate" in problem.fix
    problem = refused(capsys, [*base, out, "--from-stats", str(tmp_path)])
    assert "is not a statistics directory" in problem.error
    stats = tmp_path / "stats"
    stats.mkdir()
    (stats / MANIFEST).write_text(
        json.dumps({"format": 1, "mode": "original", "model_type": "qwen3_moe"})
    )
    # GPTQ in the recipe still calibrates: data is needed for it
    problem = refused(capsys, [*base, out, "--from-stats", str(stats)])
    assert "['GPTQModifier'] in the recipe calibrate" in problem.error
    problem = refused(
        capsys, [*base, out, "--from-stats", str(stats), "--save-stats", out]
    )
    assert "at most one of --from-stats and --save-stats" in problem.error
    problem = refused(capsys, [*base, out, "--pad"])
    assert "with a uniform budget there is nothing to pad" in problem.error
    problem = refused(capsys, _calibrate(model, stats)[:-2] + ["--methods", "nope"])
    assert "unknown method 'nope'" in problem.error
    assert not (tmp_path / "out").exists()


def test_save_stats_refuses_an_existing_directory(tiny_model_dir, tmp_path, capsys):
    argv = ["compress", "reap_w4a16", "--model", str(tiny_model_dir("qwen3_moe"))]
    argv += ["--dataset", "bundled", "--output", str(tmp_path / "out")]
    problem = refused(capsys, [*argv, "--save-stats", str(tmp_path)])
    assert "already exists" in problem.error
