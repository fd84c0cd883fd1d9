"""
Rules for vision-language MoE checkpoints: the vision tower survives whole.

Expert reduction touches only the language model, but a save that built the
text model alone (``AutoModelForCausalLM`` on a wrapper config) silently drops
the vision tower, and vLLM then fails on the first missing tensor; a missing
``preprocessor_config.json`` stops vLLM before it loads anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ream_modifiers.check.report import CheckReport
from ream_modifiers.moe.architectures import text_config_entry

__all__ = ["VISION_MARKERS", "check_multimodal"]

# what a vision tower's tensor names contain in every wrapper we support
# (Qwen3-VL and GLM-4.5V `model.visual.*`, ERNIE-VL `vision_model`, Kimi-K2.5
# `vision_tower.*`, whose projector is apart as `mm_projector.*`)
VISION_MARKERS = ("visual.", "vision_model.", "vision_tower.")


def check_multimodal(
    report: CheckReport,
    config: dict[str, Any],
    shapes: dict[str, tuple[int, ...]],
    directory: Path,
) -> None:
    """
    A config with a ``vision_config`` must come with vision weights and the
    image preprocessing config.

    :param config: the whole ``config.json``
    :param shapes: every stored tensor's shape, by name
    :param directory: the checkpoint directory
    """
    model_type = config.get("model_type")
    _, text_path = text_config_entry(config)
    for key in text_path.split(".")[:-2]:  # the dict beside the text config
        config = config[key]
    if not isinstance(config.get("vision_config"), dict):
        return
    if not any(marker in name for name in shapes for marker in VISION_MARKERS):
        report.add(
            "no-vision-weights",
            "config.json vision_config",
            f"the config describes a vision tower ({model_type}) "
            "but no vision tensors are stored: vLLM fails on the first one it "
            "looks for",
            "load the wrapper with ream_modifiers.moe.load_moe_model (it builds "
            "the whole vision-language model) and save it with save_pretrained",
        )
    if not (directory / "preprocessor_config.json").is_file():
        report.add(
            "no-preprocessor-config",
            str(directory / "preprocessor_config.json"),
            "a vision-language checkpoint without its image preprocessing "
            "config: vLLM cannot build the model's multimodal processor",
            "copy preprocessor_config.json (and video_preprocessor_config.json, "
            "if any) from the source model; ream-compress does this itself",
        )
