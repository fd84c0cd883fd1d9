"""
Refusing a source checkpoint whose weights are already compressed.

Every method here reads or rewrites full-precision expert weights. A checkpoint
saved by compressed-tensors in a compressed format (Kimi-K2.5/K2.6's INT4
release, any W4A16 or NVFP4 output, including this package's) loads into
modules that hold packed integers and scales instead of ``weight``: llm-compressor
only warns, and the run fails after the model has loaded (``'Linear' object has
no attribute 'weight'``), which for a large model is many minutes later. The
format is in ``config.json``, so the refusal comes before anything loads.
"""

from __future__ import annotations

import os
from typing import Any

from transformers import PretrainedConfig

from ream_modifiers.errors import InputError
from ream_modifiers.moe.architectures import text_config_entry

__all__ = ["QuantizedSourceError", "check_unquantized_source"]

# compressed-tensors' format of a checkpoint whose weights are stored as they are
_UNCOMPRESSED = {"dense", None}


class QuantizedSourceError(InputError):
    """A source checkpoint whose weights are stored compressed."""


def _quantization_config(config: dict[str, Any]) -> dict[str, Any] | None:
    found = config.get("quantization_config") or config.get("compression_config")
    text, prefix = text_config_entry(config)
    if found is None and prefix:
        return _quantization_config(text)
    return found


def check_unquantized_source(
    source: str | os.PathLike, trust_remote_code: bool = False
) -> None:
    """
    :param source: a local model directory or a hub ID (only its config.json is
        read)
    :raises QuantizedSourceError: if ``config.json`` declares compressed-tensors
        weights in a compressed format
    """
    try:
        config, _ = PretrainedConfig.get_config_dict(
            source, trust_remote_code=trust_remote_code
        )
    except OSError:
        return  # no config: from_pretrained raises its own error
    quantization = _quantization_config(config)
    if not isinstance(quantization, dict):
        return
    method = quantization.get("quant_method")
    fmt = quantization.get("format")
    if method != "compressed-tensors" or fmt in _UNCOMPRESSED:
        return
    raise QuantizedSourceError(
        f"{source} is already compressed (config.json quantization_config: "
        f"compressed-tensors, format {fmt!r}); expert reduction reads and "
        "rewrites full-precision expert weights, and these load as packed "
        "integers and scales",
        "start from the model's unquantized (bf16) release, or decompress this "
        "checkpoint to bf16 first, then add the quantization back in the recipe "
        "(e.g. recipes/ream_w4a16.yaml)",
    )
