"""
Renames of tensors in a saved checkpoint, for names that transformers' save
writes differently from the hub's and that its save conversions cannot give
back without breaking its other renames.

ERNIE-4.5-VL: transformers saves the vision tower as ``model.vision_model.*``;
the hub stores it as ``vision_model.*``, which vLLM's mapper reads as the tower
(``model.vision_model.*`` it maps into the language model, where nothing loads
it). transformers loads either. Memory: one shard at a time.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from transformers.utils import SAFE_WEIGHTS_INDEX_NAME as INDEX_FILENAME

from ream_modifiers.moe.architectures import MoEArchSpec
from ream_modifiers.moe.packed_names import weight_map_of

__all__ = ["rename_saved_tensors"]


def rename_saved_tensors(directory: str | os.PathLike, spec: MoEArchSpec) -> int:
    """
    Apply the row's ``saved_renames`` (``(regex, replacement)`` pairs on stored
    tensor names) to the checkpoint in ``directory``, shard by shard, and to
    its index; returns the number of tensors renamed (the ignore list's module
    names follow in :func:`ream_modifiers.moe.saved_config.write_row_config_keys`).
    """
    from safetensors.torch import load_file, save_file

    if not spec.saved_renames:
        return 0
    directory = Path(directory)
    weight_map = weight_map_of(directory)
    renamed = {
        name: new for name in weight_map if (new := spec.saved_name(name)) != name
    }
    for file in sorted({weight_map[name] for name in renamed}):
        tensors = load_file(directory / file)
        tensors = {renamed.get(name, name): t for name, t in tensors.items()}
        partial = directory / f"{file}.partial"
        save_file(tensors, partial, metadata={"format": "pt"})
        os.replace(partial, directory / file)
        del tensors
    index = directory / INDEX_FILENAME
    if renamed and index.is_file():
        content = json.loads(index.read_text())
        content["weight_map"] = dict(
            sorted((renamed.get(k, k), v) for k, v in content["weight_map"].items())
        )
        index.write_text(json.dumps(content, indent=2) + "\n")
    return len(renamed)
