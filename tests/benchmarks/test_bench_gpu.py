"""benchmarks/bench_gpu.py: its shapes, and a whole run at tiny shapes on CPU."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

BENCHMARKS = Path(__file__).parents[2] / "benchmarks"


def _load():
    sys.path.insert(0, str(BENCHMARKS))  # its imports: common, bench_offload
    spec = importlib.util.spec_from_file_location(
        "bench_gpu", BENCHMARKS / "bench_gpu.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_gpu", module)  # dataclasses look it up
    spec.loader.exec_module(module)
    return module


bench_gpu = _load()


@pytest.mark.parametrize(
    "shape, expected",
    [
        (bench_gpu.SHAPES[0], dict(experts=128, hidden=2048, width=768, groups=1)),
        (bench_gpu.SHAPES[1], dict(experts=256, hidden=7168, width=2048, groups=8)),
    ],
    ids=lambda value: getattr(value, "name", ""),
)
def test_full_shapes_build_the_published_layers(shape, expected):
    """Qwen3-30B-A3B's and DeepSeek-V3's MoE layer, built on the meta device."""
    config = AutoConfig.for_model(shape.family, **shape.config_kwargs())
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    experts = model.model.layers[0].mlp.experts
    e, h, w = expected["experts"], expected["hidden"], expected["width"]
    assert tuple(experts.gate_up_proj.shape) == (e, 2 * w, h)
    assert tuple(experts.down_proj.shape) == (e, h, w)
    assert shape.top_k == 8 and shape.groups == expected["groups"]


def test_tiny_run_reports_every_method_and_the_whole_model(tmp_path, capsys):
    output = tmp_path / "gpu.json"
    result = bench_gpu.main(
        ["--tiny", "--workdir", str(tmp_path), "--output", str(output)]
    )
    assert json.loads(output.read_text()) == result
    assert json.loads(capsys.readouterr().out.splitlines()[-1]) == result
    cases = {(case["shape"], case["method"]): case for case in result["layers"]}
    assert set(cases) == {
        (shape.name, method)
        for shape in bench_gpu.TINY_SHAPES
        for method in bench_gpu.METHODS
    }
    for case in cases.values():
        assert case["kept"] == 4  # 8 experts at 50%
        assert case["oneshot_s"] >= case["decide_s"] + case["apply_s"] > 0
        assert case["peak_device_bytes"] is None  # CPU
    whole = result["whole_model"]
    assert whole["layers"] == 2 and whole["oneshot_s"] > 0
    assert whole["peak_host_rss_over_model"] > 1
    # nothing left in the scratch folder but the JSON
    assert [p.name for p in tmp_path.iterdir()] == ["gpu.json"]
