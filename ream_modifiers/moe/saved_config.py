"""
Keys of a saved checkpoint's ``config.json`` that a save gets wrong: the expert
counts llm-compressor's save reverts, and the ``architectures`` transformers
names after its own class, and quantization ignore entries transformers needs
on reload.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from loguru import logger

from ream_modifiers.moe.architectures import MoEArchSpec, text_config_entry

__all__ = ["expert_set_counts", "patch_saved_config", "write_row_config_keys"]


def patch_saved_config(save_dir: str | os.PathLike, values: Mapping[str, object]):
    """
    Rewrite keys of a saved ``config.json`` (of its nested language model's
    config in a wrapper). llm-compressor's save re-reads the original config and
    reverts most changed keys; this puts them back.
    """
    path = Path(save_dir) / "config.json"
    config = json.loads(path.read_text())
    target, _ = text_config_entry(config)
    changed = {k: v for k, v in values.items() if target.get(k) != v}
    if not changed:
        return
    target.update(changed)
    _replace_json(path, config)
    logger.info(f"Patched {path}: {changed}")


def write_row_config_keys(save_dir: str | os.PathLike, spec: MoEArchSpec) -> None:
    """
    Write what the family's row says a saved ``config.json`` must hold beyond
    transformers' save: the hub ``architectures`` (transformers writes its own
    class name, which vLLM may not know), per-set expert counts (ERNIE-4.5-VL),
    and in a quantized checkpoint's ignore list the module names after the
    row's ``saved_renames`` and its ``reload_ignore`` entries.
    """
    path = Path(save_dir) / "config.json"
    config = json.loads(path.read_text())
    changed = False
    if spec.hub_architectures and config.get("architectures") != list(
        spec.hub_architectures
    ):
        config["architectures"] = list(spec.hub_architectures)
        changed = True
    if counts := expert_set_counts(spec, config):
        config.update(counts)  # ERNIE-4.5-VL's top-level per-set counts
        changed = True
    ignore = config.get("quantization_config", {}).get("ignore")
    if ignore is not None:
        # module names as the tensors are stored (ERNIE-4.5-VL's top-level
        # tower); regex entries stay
        stored = [e if e.startswith("re:") else spec.saved_name(e) for e in ignore]
        stored += [entry for entry in spec.reload_ignore if entry not in stored]
        if stored != ignore:
            config["quantization_config"]["ignore"] = stored
            changed = True
    if changed:
        _replace_json(path, config)


def expert_set_counts(spec: MoEArchSpec, config: dict[str, Any]) -> dict[str, Any]:
    """
    The top-level per-set count keys of a saved ``config.json`` (ERNIE-4.5-VL's
    ``moe_num_experts: [text, vision]``, which vLLM reads) set to the text
    config's count; empty where there is nothing to change.
    """
    text, prefix = text_config_entry(config)
    if not spec.expert_sets or not prefix:
        return {}
    changed = {}
    for key in spec.num_experts_keys:
        value = config.get(key)
        if isinstance(value, list) and key in text:
            counts = [text[key]] * len(value)
            if value != counts:
                changed[key] = counts
    return changed


def _replace_json(path: Path, content: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
