"""Copies of tiny checkpoints with tensors or config.json edited, for the checker."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

__all__ = ["WEIGHTS", "drop", "edited"]

WEIGHTS = "model.safetensors"


def edited(
    source: Path,
    target: Path,
    tensors: Callable[[dict[str, torch.Tensor]], None] | None = None,
    config: Callable[[dict], None] | None = None,
) -> Path:
    """
    A copy of ``source`` with its tensors and/or config.json edited in place.

    :param source: a checkpoint directory with a single ``model.safetensors``
    :param target: where the copy goes
    :param tensors: edits the state dict (name -> tensor) in place
    :param config: edits the parsed config.json in place
    """
    shutil.copytree(source, target)
    if tensors is not None:
        state = load_file(target / WEIGHTS)
        tensors(state)
        save_file(state, target / WEIGHTS, metadata={"format": "pt"})
    if config is not None:
        data = json.loads((target / "config.json").read_text())
        config(data)
        (target / "config.json").write_text(json.dumps(data))
    return target


def drop(prefix: str) -> Callable[[dict], None]:
    """A ``tensors`` edit that removes every tensor whose name starts with prefix."""

    def edit(state: dict) -> None:
        for name in [n for n in state if n.startswith(prefix)]:
            del state[name]

    return edit
