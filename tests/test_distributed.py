"""
Data-parallel calibration: 2 gloo processes under torchrun must keep, merge and
save exactly what one process does on the same calibration rows.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ream_modifiers.distributed import (
    check_sharded,
    host_copy,
    init_distributed,
    shard_for_rank,
)
from ream_modifiers.observe.statistics import _two_sum_into
from ream_modifiers.registry import methods
from ream_modifiers.saving import REPORT_FILENAME
from ream_modifiers.tiny import build_tiny_moe

WORKER = Path(__file__).with_name("torchrun_worker.py")
# one xdist worker runs this module (`make test` uses --dist loadgroup): its
# single-process references are built once, not once per worker
pytestmark = pytest.mark.xdist_group("torchrun")
# every method that calibrates reduces statistics across ranks
METHODS = [method.name for method in methods() if method.needs_data]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(args: list[str], processes: int) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    launcher = [sys.executable]
    if processes > 1:
        launcher += [
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={processes}",
            f"--master_port={_free_port()}",
        ]
    if args[0] != "-m":
        args = [str(WORKER), *args]
    result = subprocess.run(
        [*launcher, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result.stdout + result.stderr


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def _report(directory: Path) -> dict:
    layers = json.loads((directory / REPORT_FILENAME).read_text())[0]["layers"]
    # everything but wall times
    return {
        name: {k: v for k, v in entry.items() if not k.endswith("seconds")}
        for name, entry in layers.items()
    }


# session scope: under xdist the group's tests need not run back to back, and a
# module fixture would be built again after another module's test
@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    model = build_tiny_moe("qwen3_moe", root / "model")
    _run([str(model), str(root / "single")], processes=1)
    log = _run([str(model), str(root / "multi")], processes=2)
    return root, log


@pytest.mark.parametrize("method", METHODS)
def test_two_processes_save_exactly_the_single_process_checkpoint(runs, method):
    root, _ = runs
    single, multi = root / "single" / method, root / "multi" / method
    report = _report(single)
    assert _report(multi) == report  # kept, scores, groups, coefficients, tokens
    assert all(len(entry["kept"]) == 4 for entry in report.values())
    assert all(entry["calibration_tokens"] == 240 for entry in report.values())
    expected, got = _tensors(single), _tensors(multi)
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
    config = json.loads((single / "config.json").read_text())
    assert json.loads((multi / "config.json").read_text()) == config
    assert config["num_experts"] == 4


def test_each_rank_calibrated_on_its_own_share(runs):
    _, log = runs
    # the worker gives each rank its shard, so llm-compressor does not re-split
    # (it does in the deliberately unsharded run, which comes first)
    after_refusal = log.rsplit("refused:", 1)[1]
    assert "identical datasets across ranks" not in after_refusal
    # and a rank with no data for a statistic joined every collective (#3045)
    assert "check_rank_without_data passed" in log


def test_the_same_dataset_on_every_rank_is_refused_before_calibration(runs):
    root, log = runs
    assert log.count("refused: every one of the 2 ranks holds the same") == 2
    assert "Calibrating" not in log.split("refused:")[0]
    assert not (root / "multi" / "unsharded").exists()


def test_cli_under_torchrun_publishes_one_checked_output(runs):
    """The README's multi-GPU command, on 2 CPU processes: REAM then GPTQ W4A16."""
    root, _ = runs
    outputs = {}
    for processes in (1, 2):
        outputs[processes] = root / f"cli{processes}" / "out"
        _run(
            [
                "-m",
                "ream_modifiers.cli",
                "compress",
                "ream_w4a16",
                "--model",
                str(root / "model"),
                "--dataset",
                "bundled",
                "--num-samples",
                "10",
                "--max-seq-len",
                "24",
                "--output",
                str(outputs[processes]),
            ],
            processes,
        )
    single, multi = outputs[1], outputs[2]
    # published once, checked, nothing staged left behind
    assert sorted(p.name for p in multi.parent.iterdir()) == ["out"]
    assert sorted(p.name for p in multi.iterdir()) == sorted(
        p.name for p in single.iterdir()
    )
    assert _report(multi) == _report(single)
    config = json.loads((multi / "config.json").read_text())
    assert config["num_experts"] == 6 and "quantization_config" in config
    calibration = json.loads((multi / "calibration.json").read_text())
    assert calibration["rows"] == 10


def test_single_process_helpers_are_identities():
    assert not init_distributed()
    rows = list(range(5))
    assert shard_for_rank(rows) is rows
    check_sharded(rows)  # nothing to compare with


@dataclass
class _Decision:
    kept: list
    plan: dict


def test_host_copy_detaches_every_tensor_inside_a_decision():
    weight = torch.ones(3, requires_grad=True)
    decision = _Decision([0, 2], {"perm": [weight, (weight, 1)], "name": "x"})
    copied = host_copy(decision)
    assert copied.kept == [0, 2] and copied.plan["name"] == "x"
    for tensor in (copied.plan["perm"][0], copied.plan["perm"][1][0]):
        assert tensor.device.type == "cpu" and not tensor.requires_grad
    assert isinstance(copied.plan["perm"][1], tuple)
    assert decision.plan["perm"][0] is weight  # the original is untouched


def test_compensated_sums_have_the_same_bits_in_any_order():
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(400, 6, generator=generator, dtype=torch.float64)
    values *= 10.0 ** torch.randint(-8, 8, (400, 1), generator=generator)
    plain, compensated = set(), set()
    for _ in range(8):
        order = torch.randperm(400, generator=generator)
        high, low = (
            torch.zeros(6, dtype=torch.float64),
            torch.zeros(6, dtype=torch.float64),
        )
        total = torch.zeros(6, dtype=torch.float64)
        for row in values[order]:
            _two_sum_into(high, low, row)
            total += row
        compensated.add(tuple((high + low).tolist()))
        plain.add(tuple(total.tolist()))
    assert len(compensated) == 1
    assert len(plain) > 1  # the plain fp64 sum does depend on the order
