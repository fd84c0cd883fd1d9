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
import re
from pathlib import Path

from transformers.utils import SAFE_WEIGHTS_INDEX_NAME as INDEX_FILENAME

from ream_modifiers.moe.architectures import MoEArchSpec
from ream_modifiers.moe.packed_names import weight_map_of

__all__ = ["rename_saved_tensors"]


def rename_saved_tensors(directory: str | os.PathLike, spec: MoEArchSpec) -> int:
    """
    Apply the row's ``saved_renames`` (``(regex, replacement)`` pairs on stored
    tensor names) to the checkpoint in ``directory``, shard by shard, to its
    index and to the module names of a quantized checkpoint's ignore list;
    returns the number of tensors renamed.
    """
    from safetensors.torch import load_file, save_file

    if not spec.saved_renames:
        return 0
    directory = Path(directory)
    weight_map = weight_map_of(directory)
    renamed = {}
    for name in weight_map:
        new = name
        for pattern, replacement in spec.saved_renames:
            new = re.sub(pattern, replacement, new)
        if new != name:
            renamed[name] = new
    for file in sorted({weight_map[name] for name in renamed}):
        tensors = load_file(directory / file)
        tensors = {renamed.get(name, name): t for name, t in tensors.items()}
        partial = directory / f"{file}.partial"
        save_file(tensors, partial, metadata={"format": "pt"})
        os.replace(partial, directory / file)
        del tensors
    _rename_ignored_modules(directory / "config.json", spec)
    index = directory / INDEX_FILENAME
    if renamed and index.is_file():
        content = json.loads(index.read_text())
        content["weight_map"] = dict(
            sorted((renamed.get(k, k), v) for k, v in content["weight_map"].items())
        )
        index.write_text(json.dumps(content, indent=2) + "\n")
    return len(renamed)


def _rename_ignored_modules(config_path: Path, spec: MoEArchSpec) -> None:
    """The ignore list names modules as stored; its regex entries stay."""
    if not config_path.is_file():
        return
    config = json.loads(config_path.read_text())
    ignore = config.get("quantization_config", {}).get("ignore")
    if not ignore:
        return
    renamed = []
    for entry in ignore:
        if not entry.startswith("re:"):
            for pattern, replacement in spec.saved_renames:
                entry = re.sub(pattern, replacement, entry)
        renamed.append(entry)
    if renamed != ignore:
        config["quantization_config"]["ignore"] = renamed
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
