"""Pruning a checkpoint on disk from a report (issue 17 §1)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from ream_modifiers import REAMModifier, REAPModifier
from ream_modifiers.disk_prune import DiskPruneError, prune_on_disk
from tests.conftest import run_modifier


def _tensors(directory) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in directory.glob("*.safetensors"):
        tensors.update(load_file(shard))
    return tensors


@pytest.mark.parametrize(
    "family", ["qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss", "ernie4_5_moe"]
)
def test_pruning_on_disk_writes_what_pruning_in_memory_saves(
    load_tiny, calibration, tmp_path, family
):
    """The report of a REAP run, applied to the original files, gives the very
    tensors and expert counts that run saved: per-expert and fused layouts,
    router rows, router and selection biases."""
    model, tokenizer, original = load_tiny(family)
    report = tmp_path / "report.json"
    modifier = REAPModifier(sparsity=0.25, report_path=str(report))
    run_modifier(model, tokenizer, calibration(family), modifier)
    model.save_pretrained(tmp_path / "memory")
    check = prune_on_disk(original, report, tmp_path / "disk")
    assert check.ok, check.summary()
    memory, disk = _tensors(tmp_path / "memory"), _tensors(tmp_path / "disk")
    assert sorted(disk) == sorted(memory)
    for name, tensor in memory.items():
        assert torch.equal(disk[name], tensor), name
    saved = json.loads((tmp_path / "memory" / "config.json").read_text())
    pruned = json.loads((tmp_path / "disk" / "config.json").read_text())
    keys = [k for k in saved if "expert" in k and isinstance(saved[k], int)]
    assert keys and all(pruned[k] == saved[k] for k in keys)
    applied = json.loads((tmp_path / "disk" / "expert_reduction.json").read_text())
    assert applied[0]["applied_on_disk_to"] == str(original)


def test_merges_and_other_models_are_refused(load_tiny, calibration, tmp_path):
    model, tokenizer, original = load_tiny("qwen3_moe")
    report = tmp_path / "ream.json"
    modifier = REAMModifier(
        sparsity=0.25, verify_merges=False, max_activation_tokens=64,
        report_path=str(report),
    )  # fmt: skip
    run_modifier(model, tokenizer, calibration("qwen3_moe"), modifier)
    with pytest.raises(DiskPruneError, match="'REAM' \\(merge\\) is not a pruning"):
        prune_on_disk(original, report, tmp_path / "out")
    entry = json.loads(report.read_text())
    entry.update(method="REAP", layers={"model.layers.7.mlp": {"kept": [0]}})
    with pytest.raises(DiskPruneError, match="report of another model"):
        prune_on_disk(original, entry, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_prune_command(load_tiny, calibration, tmp_path, capsys):
    from ream_modifiers.cli import main
    from tests.helpers import refused

    model, tokenizer, original = load_tiny("qwen3_moe")
    report = tmp_path / "report.json"
    modifier = REAPModifier(sparsity=0.5, report_path=str(report))
    run_modifier(model, tokenizer, calibration("qwen3_moe"), modifier)
    argv = ["prune", "--model", str(original), "--report", str(report)]
    assert main([*argv, "--output", str(tmp_path / "out")]) == 0
    assert "OK" in capsys.readouterr().out
    problem = refused(capsys, [*argv, "--output", str(tmp_path / "out")])
    assert "pass --overwrite" in problem.fix
    (tmp_path / "bad.json").write_text(json.dumps({"method": "REAM", "layers": {}}))
    argv[-1] = str(tmp_path / "bad.json")
    problem = refused(capsys, [*argv, "--output", str(tmp_path / "other")])
    assert "not a pruning" in problem.error
