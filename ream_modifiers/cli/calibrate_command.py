"""
``ream-compress calibrate``: one calibration pass that records every MoE
layer's statistics for a set of methods, so that ``compress --from-stats``
applies any of them, at any ratio, with no forward pass.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from loguru import logger
from pydantic import ValidationError

from ream_modifiers.cli.args import CompressJob
from ream_modifiers.errors import InputError

__all__ = ["calibrate", "calibrate_from_namespace"]


def calibrate(
    model: str,
    dataset: str | None,
    output: str,
    methods: list[str] | None = None,
    method_settings: dict[str, dict[str, Any]] | None = None,
    **options: Any,
) -> Path | None:
    """
    Calibrate ``model`` once and write the statistics of ``methods`` (default:
    every registered method that calibrates) to the new directory ``output``
    (:mod:`ream_modifiers.observe.stats_file`). Nothing is reduced, so every
    layer sees the original model's hidden states.

    :param method_settings: method -> settings that change what it records
        (REAM's ``max_activation_tokens``, ``seed``, ...)
    :param options: the model, calibration and pipeline options of
        :func:`ream_modifiers.cli.compress` (``dtype``, ``mix``,
        ``num_samples``, ``max_seq_len``, ``offload``, ``overwrite``, ...)
    :return: the statistics directory on the source rank, None on the others
    :raises InputError: before the model loads, for an unknown method or
        setting, an existing ``output`` without ``overwrite``, or bad data
    """
    from ream_modifiers.cli.compress_command import (
        _check_before_loading,
        _check_options,
        _load,
        offload_folder_cleared,
    )
    from ream_modifiers.cli.run import calibration_shard
    from ream_modifiers.distributed import init_distributed, is_source_process

    start = time.perf_counter()
    recipe = _recipe(methods, method_settings or {}, Path(output))
    job = CompressJob.from_options(
        str(recipe), model=model, dataset=dataset, output=output, **options
    )
    init_distributed()  # a no-op unless started by torchrun
    _check_options(job)
    if job.pipeline.sequential_targets:
        raise InputError(
            "--sequential-targets is for the modifiers after an expert reduction; "
            "calibrate records whole decoder layers",
            "drop --sequential-targets (give it to compress, for GPTQ)",
        )
    if job.output.overwrite and is_source_process():
        shutil.rmtree(output, ignore_errors=True)
    modifiers = _check_before_loading(job, recipe)
    with offload_folder_cleared(job):
        moe_model, tokenizer = _load(job, modifiers)
        shard, _ = calibration_shard(moe_model, tokenizer, job)
        _run(moe_model, tokenizer, modifiers, shard, job)
    if not is_source_process():
        return None
    directory = Path(output)
    size = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
    print(
        f"\n== ream-compress calibrate ==\nstatistics       {directory} "
        f"({size / 2**20:.1f} MiB)\nseconds          "
        f"{time.perf_counter() - start:.1f}\nnext             ream-compress "
        f"compress RECIPE --model {model} --from-stats {directory} --output OUT"
    )
    return directory


def calibrate_from_namespace(args) -> Path | None:
    """Run a parsed ``ream-compress calibrate`` command line."""
    from ream_modifiers.cli.args import CALIBRATE_GROUPS, namespace_options

    return calibrate(**namespace_options(args, CALIBRATE_GROUPS))


def _recipe(methods: list[str] | None, settings: dict, output: Path) -> Path:
    """A one-modifier recipe file: ExpertStatisticsModifier for ``methods``."""
    from ream_modifiers.modifiers.calibrate import ExpertStatisticsModifier
    from ream_modifiers.registry import methods as registered

    names = list(methods or [m.name for m in registered() if m.needs_data])
    unused = sorted(set(settings) - set(names))
    if unused:
        raise InputError(
            f"--method-settings names {unused}, which are not among the methods "
            f"recorded ({names})",
            "spell them as --methods does (or as short names: reap, ream, ...)",
        )
    fields = {
        "save_statistics": str(output.resolve()),
        "methods": {name: dict(settings.get(name, {})) for name in names},
    }
    try:
        ExpertStatisticsModifier(**fields)  # unknown methods, bad settings
    except ValidationError as error:
        raise InputError(
            error.errors()[0]["msg"].removeprefix("Value error, "),
            "name registered methods (ream-compress --help) and their settings",
        ) from None
    recipe = {"calibrate_stage": {"calibrate_modifiers": {
        "ExpertStatisticsModifier": fields}}}  # fmt: skip
    path = Path(tempfile.mkdtemp(prefix="ream-calibrate-")) / "calibrate.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def _run(moe_model, tokenizer, modifiers: list, shard, job: CompressJob) -> None:
    from llmcompressor import oneshot

    from ream_modifiers.cli.run import oneshot_data

    logger.info(
        f"Calibrating {job.model.model} once for "
        f"{sorted(modifiers[0].methods)} into {job.output.output}"
    )
    data = oneshot_data(shard, tokenizer, job)
    oneshot(model=moe_model, recipe=modifiers, **data)
