"""
The non-weight files a multimodal checkpoint needs besides its tokenizer.

``oneshot`` saves the model, its config and the tokenizer it was given, but a
vision-language model (Qwen3-VL-MoE, GLM-4.5V) is served only with its image
and video preprocessing configs: without ``preprocessor_config.json`` vLLM
cannot build the model's multimodal processor and refuses to start. They are
copied unchanged from the source model, since expert reduction does not touch
what they describe.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from loguru import logger

from ream_modifiers.model_files import find_model_file

__all__ = ["PROCESSOR_FILES", "copy_processor_files"]

# what transformers' processors and vLLM's multimodal input pipeline read
PROCESSOR_FILES = (
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "processor_config.json",
    "chat_template.json",
    "chat_template.jinja",
)


def copy_processor_files(source: str, target: Path) -> list[str]:
    """
    Copy the processor files of ``source`` that ``target`` lacks (a file the
    save already wrote, such as a chat template saved with the tokenizer, is
    kept).

    :param source: the model's local directory or hub id
    :param target: the output directory
    :return: the names copied
    """
    copied = []
    for name in PROCESSOR_FILES:
        if (target / name).exists():
            continue
        found = find_model_file(source, name)
        if found is None:
            continue
        shutil.copyfile(found, target / name)
        copied.append(name)
    if copied:
        logger.info(f"Copied {', '.join(copied)} from {source}")
    return copied
