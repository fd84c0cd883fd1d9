"""Expert reduction on a disk-offloaded model: the same decisions and weights."""

import json

import pytest
import torch
from llmcompressor import oneshot
from llmcompressor.core import reset_session
from safetensors.torch import load_file

from ream_modifiers import DERNModifier, REAMModifier, REAPModifier
from ream_modifiers.moe import find_moe_layers, load_moe_model
from ream_modifiers.moe.offload import disk_offloaded
from tests.conftest import NUM_SAMPLES, SEQ_LEN

METHODS = {
    "REAP": lambda: REAPModifier(num_experts=6),
    # merges write new weights into the kept centroids (every group merged)
    "REAM": lambda: REAMModifier(
        num_experts=4, group_size=4, max_activation_tokens=64, verify_merges=False
    ),
    # recombined experts and summed router rows, both written in place
    "DERN": lambda: DERNModifier(num_experts=6, similarity_threshold=0.0),
}


def _compress(path, tokenizer, dataset, method, out, offload_folder=None):
    offload = "none" if offload_folder is None else "disk"
    model = load_moe_model(
        path, dtype=torch.float32, offload=offload, offload_folder=offload_folder
    )
    assert disk_offloaded(model) == (offload == "disk")
    modifier = METHODS[method]()
    reset_session()
    oneshot(
        model=model,
        dataset=dataset,
        recipe=[modifier],
        processor=tokenizer,
        num_calibration_samples=NUM_SAMPLES,
        max_seq_length=SEQ_LEN,
        # shuffled (the default): the two runs see the batches in different
        # orders, and sums and activation samples must not depend on it
        output_dir=str(out),
    )
    report = json.loads((out / "expert_reduction.json").read_text())[0]
    return model, report, load_file(out / "model.safetensors")


@pytest.mark.parametrize("method", sorted(METHODS))
def test_disk_offloaded_run_matches_the_in_memory_run(
    method, load_tiny, calibration, tmp_path
):
    _, tokenizer, path = load_tiny("qwen3_moe")
    dataset = calibration("qwen3_moe")
    _, report, tensors = _compress(path, tokenizer, dataset, method, tmp_path / "mem")
    folder = tmp_path / "offload"
    model, disk_report, disk_tensors = _compress(
        path, tokenizer, dataset, method, tmp_path / "disk", offload_folder=folder
    )
    for name, entry in report["layers"].items():
        assert disk_report["layers"][name]["kept"] == entry["kept"], name
        assert disk_report["layers"][name].get("groups") == entry.get("groups")
    assert disk_tensors.keys() == tensors.keys()
    for key, value in tensors.items():
        assert torch.equal(disk_tensors[key], value), key
    # the edits went through the offloaded storage: written files beside the links
    assert any(not f.is_symlink() for f in folder.iterdir())
    assert find_moe_layers(model)[0].num_experts == report["num_experts_after"]
    if method != "REAP":
        original = load_file(path / "model.safetensors")
        name = "model.layers.0.mlp.experts.{}.gate_proj.weight"
        changed = [
            e
            for e in range(report["num_experts_after"])
            if not any(
                torch.equal(tensors[name.format(e)], original[name.format(o)])
                for o in range(8)
            )
        ]
        assert changed, f"{method} changed no expert: the comparison proves nothing"
