import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from transformers import AutoModelForCausalLM

from ream_modifiers.card import CARD_FILENAME
from ream_modifiers.check import check_checkpoint
from ream_modifiers.cli import REPO_ROOT, SUMMARY_FILENAME, compress, main
from ream_modifiers.errors import InputError
from ream_modifiers.plot import PLOT_FILENAME
from ream_modifiers.saving import REPORT_FILENAME
from tests.helpers import refused


def _args(model, out, recipe="aimer_w4a16", *extra) -> list[str]:
    return [
        "compress",
        recipe,
        "--model",
        str(model),
        "--dataset",
        "bundled",
        "--num-samples",
        "4",
        "--max-seq-len",
        "16",
        "--output",
        str(out),
        *extra,
    ]


def test_compress_writes_a_complete_checkpoint(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "calib.jsonl"
    data.write_text(
        "\n".join(json.dumps({"text": f"line {i} of some text"}) for i in range(20))
    )
    out = tmp_path / "out"
    out.mkdir()  # an empty directory is not refused
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
        CARD_FILENAME,
        PLOT_FILENAME,
    ):
        assert (out / name).is_file(), name
    assert (out / PLOT_FILENAME).read_bytes().startswith(b"\x89PNG")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.jsonl", "out"]
    assert check_checkpoint(out).ok
    report = json.loads((out / REPORT_FILENAME).read_text())[0]
    for entry in report["layers"].values():
        assert entry["decide_seconds"] >= 0 and entry["apply_seconds"] >= 0
    card = (out / CARD_FILENAME).read_text()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["library_name"] == "transformers"
    assert "base_model" not in meta  # a local path is no Hub ID
    assert meta["tags"][:4] == ["moe", "expert-pruning", "aimer", "compressed-tensors"]
    assert "w4a16" in meta["tags"]
    for text in (
        '"AIMER: Calibration-Free Task-Agnostic MoE Pruning" '
        "([arXiv 2603.18492](https://arxiv.org/abs/2603.18492))",
        "| routed experts per MoE layer | 8 | 6 |",
        "- **Quantization:** W4A16, compressed-tensors format `pack-quantized`",
        f"- **Calibration data:** 8 rows of `{data}`, up to 32 tokens each",
        f"vllm serve {out}\n",
        f'llm = LLM(model="{out}")',
        "`ream-compress check` passed (qwen3_moe, 2 MoE layers x 6 experts, "
        "pack-quantized)",
        f"ream-compress compress aimer_w4a16 --model {tiny_model_dir('qwen3_moe')}",
        f"![expert scores per layer]({PLOT_FILENAME})",
    ):
        assert text in card, text
    summary = json.loads((out / SUMMARY_FILENAME).read_text())
    assert summary["parameters_after"] < summary["parameters_before"]
    assert summary["gib_after"] < summary["gib_before"]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.model.layers[0].mlp.experts.gate_up_proj.shape[0] == 6


def test_compress_and_check_fused_gpt_oss(tiny_model_dir, tmp_path, capsys):
    """
    Unquantized gpt-oss is saved fused like the hub; both the check the CLI runs
    before publishing and ``ream-compress check`` accept that layout.
    """
    from safetensors import safe_open

    recipe = tmp_path / "aimer.yaml"
    recipe.write_text(
        "aimer_stage:\n  aimer_modifiers:\n    AIMERModifier:\n      sparsity: 0.25\n"
    )
    out = tmp_path / "out"
    assert main(_args(tiny_model_dir("gpt_oss"), out, str(recipe))) == 0
    capsys.readouterr()
    assert main(["check", str(out)]) == 0
    assert capsys.readouterr().out.startswith(
        f"OK {out}: gpt_oss, 2 MoE layers x 6 experts, unquantized"
    )
    with safe_open(out / "model.safetensors", "pt") as handle:
        shape = handle.get_slice("model.layers.1.mlp.experts.gate_up_proj").get_shape()
        assert not any(".experts.0." in name for name in handle.keys())
    assert shape == [6, 128, 256]


def test_failed_run_leaves_no_output(tiny_model_dir, tmp_path, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("s_stage:\n  s_modifiers:\n    REAPModifier: {num_experts: 1}\n")
    out = tmp_path / "out"
    argv = _args(tiny_model_dir("qwen3_moe"), out, str(recipe))
    assert "top_k=2" in refused(capsys, argv).error
    assert list(tmp_path.iterdir()) == [recipe]


def _refused(capsys, argv: list[str], message: str) -> None:
    """``main`` refuses ``argv`` with an ``error:`` line matching ``message``."""
    error = refused(capsys, argv).error
    assert re.search(message, error), error


def test_unknown_recipe_and_existing_output(tmp_path, capsys):
    argv = ["compress", "nope", "--model", "m", "--dataset", "bundled"]
    _refused(capsys, [*argv, "--output", str(tmp_path / "o")], "not found; known")
    (tmp_path / "keep.txt").write_text("mine")
    _refused(capsys, _args("m", tmp_path), "exists and is not empty; pass --overwrite")
    _refused(
        capsys,
        _args("m", tmp_path / "keep.txt", "aimer_w4a16", "--overwrite"),
        "exists and is not a directory",
    )
    assert (tmp_path / "keep.txt").read_text() == "mine"
    with pytest.raises(InputError, match="not found; known recipes"):
        compress("nope", "m", "bundled", str(tmp_path / "o"))


def test_compress_with_a_calibration_mix(tiny_model_dir, tmp_path, capsys):
    code_dir = tmp_path / "code"
    code_dir.mkdir()
    (code_dir / "a.txt").write_text("def f(x):\n    return x * 2\n\n" * 20)
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("from an earlier run")
    main(
        [
            "compress",
            "--overwrite",
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
    assert not (out / "stale.txt").exists()  # --overwrite replaced the whole output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["code", "out"]
    card = (out / CARD_FILENAME).read_text()
    merged = any(entry["groups"] for entry in report[0]["layers"].values())
    assert ("- expert-merging\n" in card) == merged
    proposed = sum(len(e["merge_errors"]) for e in report[0]["layers"].values())
    assert f"of {proposed} proposed merges kept" in card
    assert "mix of code 4, general 2, math 2 rows" in card
    _refused(
        capsys,
        ["compress", "ream_w4a16", "--model", "m", "--output", str(tmp_path / "x")],
        "exactly one of --dataset and --mix",
    )


def test_failed_check_leaves_no_output(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """
    With ``num_experts`` in the base config (as in hub Qwen3-MoE configs),
    llm-compressor's save reverts the count keys to 8; without our config patch
    the check must stop the run before anything reaches the output path.
    """
    model = shutil.copytree(tiny_model_dir("qwen3_moe"), tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "num_experts": 8}))
    monkeypatch.setattr("ream_modifiers.saving.patch_saved_config", lambda *a: None)
    out = tmp_path / "out"
    assert main(_args(model, out)) == 1
    err = capsys.readouterr().err
    assert f"failed the check, so nothing was written to {out}" in err
    assert "[config-count] config.json num_local_experts: num_local_experts=8" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_remote_code_is_not_trusted_by_default(
    tiny_model_dir, tmp_path, monkeypatch, capsys
):
    seen = {}

    def fake_load(model, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop after loading")

    monkeypatch.setattr("ream_modifiers.moe.load.load_moe_model", fake_load)
    model = tiny_model_dir("qwen3_moe")
    for extra, trusted in (((), False), (("--trust-remote-code",), True)):
        # an unexpected failure: one line and exit 1, the traceback with --debug
        assert main(_args(model, tmp_path / "out", "aimer_w4a16", *extra)) == 1
        assert seen["trust_remote_code"] is trusted
        err = capsys.readouterr().err
        assert "error: RuntimeError: stop after loading\nfix: rerun with --debug" in err
        assert "Traceback" not in err
    assert main(_args(model, tmp_path / "out", "aimer_w4a16", "--debug")) == 1
    assert "Traceback (most recent call last)" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def _signal_once_staging(model, out, signum) -> tuple[subprocess.Popen, Path]:
    """Run the CLI in a child, send ``signum`` once it writes its staging dir."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-m", "ream_modifiers.cli", *_args(model, out)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        # as from a terminal: a test run started in the background has SIGINT
        # ignored, which its children would inherit (and rightly keep ignoring)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    staging = out.parent / f".{out.name}.tmp-{process.pid}"
    deadline = time.monotonic() + 600
    try:
        while not staging.exists():
            assert process.poll() is None, "the run ended before the signal"
            assert time.monotonic() < deadline, "the run never started writing"
            time.sleep(0.02)
    finally:
        process.send_signal(signum)
        process.wait(timeout=120)
    return process, staging


def test_killed_run_leaves_no_output_and_a_rerun_succeeds(tiny_model_dir, tmp_path):
    model = tiny_model_dir("qwen3_moe")
    out = tmp_path / "out"
    process, staging = _signal_once_staging(model, out, signal.SIGKILL)
    assert process.returncode == -signal.SIGKILL
    assert not out.exists()
    assert staging.is_dir()  # killed mid-run: nothing cleaned up after it

    assert main(_args(model, out)) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert check_checkpoint(out).ok
    assert (out / CARD_FILENAME).is_file()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_terminated_run_removes_its_staging_directory(tiny_model_dir, tmp_path, signum):
    """A cancelled job (SIGTERM) or Ctrl-C (SIGINT) cleans up on the way out."""
    out = tmp_path / "out"
    process, staging = _signal_once_staging(tiny_model_dir("qwen3_moe"), out, signum)
    assert process.returncode != 0
    assert not out.exists()
    assert not staging.exists()
    assert list(tmp_path.iterdir()) == []


# -- larger than memory --------------------------------------------------------


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--offload", "disk"], "needs an offload folder"),
        (["--offload-folder", "f"], "only used with offload 'disk' or 'auto'"),
        (["--sequential-targets-per-subgraph", "0"], "must be >= 1"),
    ],
)
def test_bad_offload_options_fail_before_loading(tmp_path, capsys, extra, message):
    # the model does not exist: the error must come before it is loaded
    argv = _args(tmp_path / "no-such-model", tmp_path / "out", "reap_w4a16", *extra)
    _refused(capsys, argv, message)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_compress_with_disk_offload_matches_in_memory(tiny_model_dir, tmp_path):
    """REAP + GPTQ W4A16 on disk-offloaded weights: the same checkpoint, bit for bit."""
    import torch
    from safetensors.torch import load_file

    model = tiny_model_dir("qwen3_moe")
    outputs = {}
    for name, extra in [
        ("mem", []),
        ("disk", ["--offload", "disk", "--offload-folder", str(tmp_path / "off")]),
    ]:
        torch.manual_seed(0)  # oneshot shuffles the calibration rows
        assert main(_args(model, tmp_path / name, "reap_w4a16", *extra)) == 0
        outputs[name] = load_file(tmp_path / name / "model.safetensors")
    assert not (tmp_path / "off").exists()  # the scratch folder is removed
    assert outputs["disk"].keys() == outputs["mem"].keys()
    for key, value in outputs["mem"].items():
        assert torch.equal(outputs["disk"][key], value), key
    summaries = [
        json.loads((tmp_path / name / SUMMARY_FILENAME).read_text())
        for name in ("mem", "disk")
    ]
    for key in ("parameters_before", "gib_before", "parameters_after"):
        assert summaries[0][key] == summaries[1][key], key
    assert check_checkpoint(tmp_path / "disk").ok


def test_sequential_targets_quantize_per_expert_after_the_reduction(
    tiny_model_dir, tmp_path, monkeypatch
):
    import llmcompressor

    calls = []
    original = llmcompressor.oneshot

    def spy(**kwargs):
        calls.append(kwargs)
        return original(**kwargs)

    monkeypatch.setattr(llmcompressor, "oneshot", spy)
    out = tmp_path / "out"
    targets = ["--sequential-targets", "Qwen3MoeAttention", "ExpertMLP"]
    extra = [*targets, "--sequential-targets-per-subgraph", "4"]
    assert main(_args(tiny_model_dir("qwen3_moe"), out, "reap_w4a16", *extra)) == 0
    # the reduction with decoder-layer subgraphs, then GPTQ four experts at a time
    assert len(calls) == 2
    assert [type(m).__name__ for m in calls[0]["recipe"]] == ["REAPModifier"]
    assert "sequential_targets" not in calls[0]
    assert [type(m).__name__ for m in calls[1]["recipe"]] == ["GPTQModifier"]
    assert calls[1]["sequential_targets"] == ["Qwen3MoeAttention", "ExpertMLP"]
    assert calls[1]["sequential_targets_per_subgraph"] == 4
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    modifiers = next(iter(next(iter(recipe.values())).values()))
    assert list(modifiers) == ["REAPModifier", "GPTQModifier"]
    config = json.loads((out / "config.json").read_text())
    assert "model.layers.0.mlp.gate" in config["quantization_config"]["ignore"]
    assert config["num_experts"] == 6
    assert check_checkpoint(out).ok


def test_check_vllm_without_vllm_names_the_fix(tiny_model_dir, capsys):
    """This environment has no vLLM (it lives in .venv-vllm): exit 2, say how."""
    from ream_modifiers.cli import main

    code = main(["check", str(tiny_model_dir("qwen3_moe")), "--vllm"])
    assert code == 2
    err = capsys.readouterr().err
    assert "cannot import vllm" in err
    assert "--vllm-python" in err


def test_compress_check_vllm_without_vllm_fails_before_calibration(
    tiny_model_dir, tmp_path, no_calibration
):
    from ream_modifiers.cli import compress

    with pytest.raises(InputError, match="--check-vllm: .*cannot import vllm"):
        compress(
            "reap_w4a16",
            str(tiny_model_dir("qwen3_moe")),
            "bundled",
            str(tmp_path / "out"),
            num_samples=4,
            max_seq_len=16,
            check_vllm=True,
        )
    assert not (tmp_path / "out").exists()


def test_vllm_probe_surfaces_the_engine_processes_root_cause():
    from ream_modifiers.check.vllm_probe import _root_cause

    stderr = (
        "(VllmWorker-0 pid=1) ERROR [x.py:9] Traceback (most recent call last):\n"
        "(VllmWorker-0 pid=1) ERROR [x.py:9] ValueError: Available memory on node 0 "
        "is less than desired CPU memory utilization\n"
        "(EngineCore pid=2) ERROR [core.py:1] Exception: WorkerProc initialization "
        "failed. See stack trace for root cause.\n"
    )
    error = {"error": "RuntimeError: Engine core init failed. See root cause above."}
    assert _root_cause(error, stderr) == (
        "ValueError: Available memory on node 0 is less than desired CPU memory "
        "utilization"
    )
    assert _root_cause({"error": "KeyError: 'x'"}, stderr) == "KeyError: 'x'"


@pytest.mark.parametrize("verbose", [False, True])
def test_per_module_gptq_logs_only_with_verbose(tiny_model_dir, tmp_path, verbose):
    """The default log is per layer; --verbose restores llm-compressor's."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    args = _args(tiny_model_dir("qwen3_moe"), tmp_path / "out", "reap_w4a16")
    run = subprocess.run(
        [sys.executable, "-m", "ream_modifiers.cli", *args]
        + (["--verbose"] if verbose else []),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    log = run.stdout + run.stderr
    assert ("| METRIC - error" in log) is verbose
    assert ("Quantizing" in log) is verbose
    assert "REAP model.layers.0.mlp: kept 6/8" in log  # our per-layer line
