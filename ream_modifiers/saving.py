"""
What every saved checkpoint gets on top of llm-compressor's save: the right expert
count under every config key, quantized experts under the names vLLM reads where
the family needs other names than compressed-tensors' (gpt-oss), the
per-layer report of what was removed, and a vision-language model's processor
files from the source model.
"""

from __future__ import annotations

import json
import os
from functools import wraps
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel

from ream_modifiers.allocator import release_freed_memory_eagerly
from ream_modifiers.distributed import is_source_process
from ream_modifiers.model_files import find_model_file
from ream_modifiers.moe.architectures import get_arch_spec, text_config
from ream_modifiers.moe.auto import is_multimodal
from ream_modifiers.moe.mtp import carry_mtp_layers
from ream_modifiers.moe.offload import disk_offloaded
from ream_modifiers.moe.packed_names import write_packed_names
from ream_modifiers.moe.saved_config import (
    patch_saved_config,
    write_row_config_keys,
)
from ream_modifiers.moe.saved_names import rename_saved_tensors
from ream_modifiers.processor_files import copy_processor_files

__all__ = ["REPORT_FILENAME", "record_for_save", "install_save_hook"]

REPORT_FILENAME = "expert_reduction.json"
_STATE_ATTR = "_ream_save_state"
# shard size when saving a model with weights on disk (bounds the save's memory)
OFFLOADED_SHARD_SIZE = "2GB"


def _state(model: PreTrainedModel) -> dict[str, Any]:
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        state = {"config": {}, "reports": []}
        setattr(model, _STATE_ATTR, state)
    return state


def record_for_save(
    model: PreTrainedModel,
    config_values: dict[str, Any] | None = None,
    report: dict[str, Any] | None = None,
) -> None:
    """Remember config keys and a report to write on every later save."""
    state = _state(model)
    state["config"].update(config_values or {})
    if report is not None:
        state["reports"] = [r for r in state["reports"] if r is not report] + [report]


def install_save_hook(model: PreTrainedModel) -> None:
    """
    Wrap ``model.save_pretrained`` (idempotently, outside llm-compressor's own
    wrapper) so that after the save ``config.json`` carries the recorded keys and
    the report lands next to the weights, and freed host memory is returned to
    the system while it saves (:mod:`ream_modifiers.allocator`).
    """
    save = model.save_pretrained
    if getattr(save, "_ream_wrapped", False):
        return
    _state(model)

    @wraps(save)
    def save_pretrained(save_directory: str | os.PathLike, *args, **kwargs):
        # packing the quantized modules frees every float weight in turn: give
        # that memory back instead of letting glibc's heap keep it
        release_freed_memory_eagerly()
        if disk_offloaded(model):
            # transformers reads a disk-offloaded model back one shard at a time;
            # llm-compressor's 20GB default would hold 20GB in memory
            kwargs.setdefault("max_shard_size", OFFLOADED_SHARD_SIZE)
        result = save(save_directory, *args, **kwargs)
        finish_saved_checkpoint(model, save_directory)
        return result

    save_pretrained._ream_wrapped = True
    # llm-compressor skips re-wrapping a method marked this way
    save_pretrained._overridden = True
    model.save_pretrained = save_pretrained


def finish_saved_checkpoint(model: PreTrainedModel, save_directory) -> None:
    if not is_source_process():  # the source rank alone writes the checkpoint
        return
    state = _state(model)
    if state["config"]:
        patch_saved_config(save_directory, state["config"])
    spec = get_arch_spec(model.config)
    write_row_config_keys(save_directory, spec)
    if spec.packed_expert_names:
        write_packed_names(save_directory, spec)
    rename_saved_tensors(save_directory, spec)
    source = model.name_or_path
    mtp = {}
    if source and Path(source).resolve() != Path(save_directory).resolve():
        if getattr(model.config, "vision_config", None) is not None or (
            is_multimodal(model.config)  # Qwen3-Omni: nested in thinker_config
        ):
            # a multimodal model is served only with its preprocessing configs
            copy_processor_files(source, Path(save_directory))
        if spec.mtp_layers_key or spec.mtp_module:
            # a hub model's files are in its cache snapshot
            config_file = find_model_file(source, "config.json")
            if config_file is not None:
                target = Path(save_directory)
                mtp = _carry_mtp(model, spec, config_file.parent, target)
    if state["reports"]:
        if mtp:
            state["reports"][-1]["mtp_layers"] = mtp
        path = Path(save_directory) / REPORT_FILENAME
        path.write_text(json.dumps(state["reports"], indent=2) + "\n")


def _carry_mtp(model, spec, source: Path, target: Path) -> dict[str, Any]:
    """The source's MTP layers, reduced to the saved model's expert count."""
    text = text_config(model.config)
    n_group, _ = spec.groups(lambda key: getattr(text, key, None))
    return carry_mtp_layers(
        source,
        target,
        spec,
        text.to_dict(),
        kept_count=getattr(text, spec.num_experts_key),
        n_group=n_group,
    )
