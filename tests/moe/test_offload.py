"""Offloaded loading, and weight writes that reach offloaded storage."""

import os

import pytest
import torch
from compressed_tensors.offload import disable_offloading, disable_onloading
from compressed_tensors.offload.cache import CPUCache, DiskCache

from ream_modifiers.moe import (
    find_moe_layers,
    keep_experts,
    load_moe_model,
    set_router_rows,
    write_expert,
)
from ream_modifiers.moe.offload import (
    OffloadOptionError,
    parameter_totals,
    write_parameter,
)


def _state(model) -> dict[str, torch.Tensor]:
    # state_dict() onloads every offloaded tensor (a fresh read from disk)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _disk_model(tiny_model_dir, tmp_path, model_type="qwen3_moe"):
    return load_moe_model(
        tiny_model_dir(model_type),
        dtype=torch.float32,
        offload="disk",
        offload_folder=tmp_path / "offload",
    )


@pytest.mark.parametrize(
    "model_type, offload",
    [
        ("qwen3_moe", "disk"),  # per-expert modules built at construction
        ("qwen3_moe", "cpu"),
        ("qwen3_moe", "auto"),
        ("mixtral", "disk"),  # loaded fused, linearized layer by layer
    ],
)
def test_offloaded_load_gives_the_checkpoint_weights(
    tiny_model_dir, tmp_path, model_type, offload
):
    path = tiny_model_dir(model_type)
    reference = load_moe_model(path, dtype=torch.float32)
    folder = None if offload == "cpu" else tmp_path / "offload"
    extra = {"max_memory": {"cpu": 100_000}} if offload == "auto" else {}
    model = load_moe_model(
        path, dtype=torch.float32, offload=offload, offload_folder=folder, **extra
    )
    cache = CPUCache if offload == "cpu" else DiskCache
    layer = find_moe_layers(model)[0]
    assert isinstance(layer.expert(3).gate_proj._parameters, cache)
    expected = _state(reference)
    state = _state(model)
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(state[key], value), key
    ids = torch.arange(12).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    if model_type == "qwen3_moe" and offload == "disk":
        # read in place from the checkpoint: the folder holds links, no copies
        files = list((tmp_path / "offload").iterdir())
        assert files and all(f.is_symlink() for f in files)


@pytest.mark.parametrize(
    "offload, folder, kwargs, message",
    [
        ("disk", None, {}, "needs an offload folder"),
        ("auto", None, {}, "needs an offload folder"),
        ("ssd", None, {}, "offload must be one of"),
        ("cpu", "dir", {}, "only used with offload 'disk' or 'auto'"),
        ("none", "dir", {}, "only used with offload 'disk' or 'auto'"),
        ("disk", "dir", {"device_map": "auto"}, "not both"),
        ("disk", "full", {}, "must be an empty or new directory"),
    ],
)
def test_bad_offload_options_fail_before_loading(
    tmp_path, offload, folder, kwargs, message
):
    if folder is not None:
        folder = tmp_path / folder
    if folder is not None and folder.name == "full":
        folder.mkdir()
        (folder / "ct_disk_cache_0_1.safetensors").write_text("")
    missing = tmp_path / "no-such-model"  # loading it would fail differently
    with pytest.raises(OffloadOptionError, match=message):
        load_moe_model(missing, offload=offload, offload_folder=folder, **kwargs)


@pytest.mark.parametrize("onloaded", [False, True])
def test_edits_reach_disk_storage(tiny_model_dir, tmp_path, onloaded):
    """
    Writes land on disk, both outside and inside ``disable_offloading`` (where
    llm-compressor's pipeline runs the edits and a stale onloaded copy would
    otherwise be used by the propagation pass), and the module objects are kept.
    """
    model = _disk_model(tiny_model_dir, tmp_path)
    layer = find_moe_layers(model)[1]
    kept_objects = [layer.expert(i) for i in (6, 2, 5)]
    new_gate = torch.randn(128, 128)
    new_down = torch.randn(128, 128)
    rows = torch.randn(8, 128)
    with disable_offloading() if onloaded else torch.no_grad():
        _ = layer.expert(2).gate_proj.weight  # an onloaded copy, when held
        write_expert(layer, 2, gate=new_gate, down=new_down)
        set_router_rows(layer, rows)  # same shape: stored in place
        assert torch.equal(layer.expert(2).gate_proj.weight, new_gate)
        keep_experts(layer, [6, 2, 5])
    assert [layer.expert(i) for i in range(3)] == kept_objects
    # fresh reads from the offload folder
    assert torch.equal(layer.expert(1).gate_proj.weight, new_gate)
    assert torch.equal(layer.expert(1).down_proj.weight, new_down)
    assert torch.equal(layer.router.weight, rows[[6, 2, 5]])
    assert isinstance(layer.expert(1).gate_proj._parameters, DiskCache)
    written = [f for f in (tmp_path / "offload").iterdir() if not f.is_symlink()]
    assert len(written) >= 3  # gate, down and the router rows; links stay links
    with disable_onloading():
        assert layer.router.weight.device.type == "meta"
        assert layer.expert(1).gate_proj.weight.device.type == "meta"


def test_write_parameter_checks_the_shape(tiny_model_dir, tmp_path):
    model = _disk_model(tiny_model_dir, tmp_path)
    linear = find_moe_layers(model)[0].expert(0).up_proj
    with pytest.raises(ValueError, match="cannot write \\(4, 4\\)"):
        write_parameter(linear, "weight", torch.zeros(4, 4))
    # a non-contiguous value (DERN's recombined rows) and another dtype are fine
    value = torch.randn(128, 128, dtype=torch.float64).t()
    write_parameter(linear, "weight", value)
    assert torch.equal(linear.weight, value.float())


def test_parameter_totals_do_not_read_offloaded_weights(
    tiny_model_dir, tmp_path, monkeypatch
):
    reference = load_moe_model(tiny_model_dir("qwen3_moe"), dtype=torch.float32)
    model = _disk_model(tiny_model_dir, tmp_path)

    def no_reads(self, offloaded):
        raise AssertionError("read from disk")

    monkeypatch.setattr(DiskCache, "onload", no_reads)
    count = sum(p.numel() for p in reference.parameters())
    assert parameter_totals(model) == (count, 4 * count)
    assert os.listdir(tmp_path / "offload")
