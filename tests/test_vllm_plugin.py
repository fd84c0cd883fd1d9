"""The vLLM plugin's wiring, without vLLM (the vLLM tier serves with it)."""

import importlib.util
import logging
import tomllib
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from ream_modifiers import vllm_plugin
from ream_modifiers.moe.per_layer import PER_LAYER_FAMILIES, counting_init

ROOT = Path(__file__).resolve().parents[1]


def test_the_entry_point_vllm_loads_is_declared_and_installed():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    declared = project["project"]["entry-points"]["vllm.general_plugins"]
    assert declared == {"ream_per_layer_experts": "ream_modifiers.vllm_plugin:register"}
    installed = {e.name: e.value for e in entry_points(group="vllm.general_plugins")}
    assert installed["ream_per_layer_experts"] == "ream_modifiers.vllm_plugin:register"


@pytest.mark.skipif(
    importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here"
)
def test_without_vllm_the_plugin_warns_and_patches_nothing(caplog):
    with caplog.at_level(logging.WARNING):
        vllm_plugin.register()
    assert sorted(PER_LAYER_FAMILIES) == ["qwen3_moe"]
    for model_type in PER_LAYER_FAMILIES:
        assert f"unavailable for {model_type}" in caplog.text


def test_each_layer_is_built_reading_its_own_count():
    class Config:
        num_local_experts = 8
        num_experts_per_layer = [8, None, 4]

    class Layer:  # vLLM's signature: the config, then the prefix
        def __init__(self, config, cache_config=None, prefix=""):
            self.count = config.num_local_experts

    config = Config()
    Layer.__init__ = counting_init(
        Layer.__init__,
        "num_local_experts",
        lambda args, kwargs: config,
        vllm_plugin._layer_index,
    )
    assert Layer(config, prefix="model.layers.2").count == 4
    assert Layer(config, None, "model.layers.0").count == 8
    assert Layer(config, prefix="model.layers.1").count == 8  # no MoE: as is
    assert config.num_local_experts == 8  # restored after each layer
    Config.num_experts_per_layer = None
    assert Layer(config, prefix="model.layers.2").count == 8
