"""
Errors in what a user gave (a recipe, a model path, data), raised before any
calibration: each carries the problem and the fix, which the CLI prints as
``error:`` and ``fix:`` lines with exit code 2.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["InputError", "check_model_source", "looks_local"]


class InputError(ValueError):
    """Bad input: what is wrong and how to fix it."""

    def __init__(self, problem: str, fix: str):
        super().__init__(f"{problem}\nfix: {fix}")
        self.problem = problem
        self.fix = fix


def looks_local(source: str) -> bool:
    """A path rather than a hub ID (``org/name`` or a bare legacy name)."""
    return (
        os.path.isabs(source)
        or source.startswith((".", "~"))
        or source.count("/") > 1
        or "\\" in source
    )


def check_model_source(source: str) -> None:
    """
    :raises InputError: for a local model path that does not exist or holds no
        ``config.json`` (transformers would report it as a malformed hub ID)
    """
    path = Path(source).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise InputError(
                f"model directory {source} has no config.json",
                "point --model at a saved Hugging Face checkpoint (config.json, "
                "*.safetensors, tokenizer files)",
            )
        return
    if looks_local(source):
        raise InputError(
            f"model directory {source} does not exist",
            "check the path, or give a Hugging Face model ID such as "
            "Qwen/Qwen3-30B-A3B",
        )
