"""A loaded model through calibration, compression, the check and publishing."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from loguru import logger

from ream_modifiers.cli.args import (
    CalibrationArguments,
    CompressJob,
    PipelineArguments,
)
from ream_modifiers.cli.summary import (
    CALIBRATION_FILENAME,
    SUMMARY_FILENAME,
    CompressionSummary,
    checkpoint_bytes,
    checkpoint_parameters,
    write_provenance,
)
from ream_modifiers.output import shared_staged_output

__all__ = ["calibration_shard", "compress_loaded_model", "oneshot_data"]


def compress_loaded_model(
    moe_model, tokenizer, recipe_path: Path, job: CompressJob, start: float
) -> CompressionSummary | None:
    """
    Calibrate, compress, check and publish a loaded model (see
    :func:`ream_modifiers.cli.compress_command`).

    :param start: ``time.perf_counter()`` when the run started
    :return: the summary on the source rank, None on the others
    """
    from ream_modifiers.distributed import barrier, is_source_process
    from ream_modifiers.moe.layer import find_moe_layers
    from ream_modifiers.moe.offload import parameter_totals
    from ream_modifiers.saving import REPORT_FILENAME

    layers = find_moe_layers(moe_model)
    experts_before = layers[0].num_experts
    # counted without onloading: an offloaded model is not read back for this
    parameters_before, bytes_before = parameter_totals(moe_model)
    shard, calibration_info = calibration_shard(moe_model, tokenizer, job)
    output = job.output
    with shared_staged_output(Path(output.output), output.overwrite) as partial:
        _run_oneshot(moe_model, recipe_path, partial, shard, tokenizer, job)
        barrier()  # every rank's part of the save is on disk
        if not is_source_process():
            return None
        if job.statistics.pad:
            from ream_modifiers.disk_pad import pad_in_place

            pad_in_place(partial)  # one count for stock loaders
        report_file = partial / REPORT_FILENAME
        reports = json.loads(report_file.read_text()) if report_file.exists() else []
        summary = CompressionSummary(
            model=job.model.model,
            recipe=str(recipe_path),
            experts_per_layer_before=experts_before,
            experts_per_layer_after=(
                reports[-1]["num_experts_after"] if reports else None
            ),
            moe_layers=len(layers),
            parameters_before=parameters_before,
            parameters_after=checkpoint_parameters(partial),
            gib_before=bytes_before / 2**30,
            gib_after=checkpoint_bytes(partial) / 2**30,
            seconds=time.perf_counter() - start,
        )
        _publish(partial, job, reports, summary, calibration_info)
    return summary


def calibration_shard(
    moe_model, tokenizer, job: CompressJob
) -> tuple[Any, dict[str, Any]]:
    """
    This rank's calibration rows (with image rows for a vision-language model)
    and what ``calibration.json`` says of them; ``(None, ...)`` when the
    recipe needs no data (``--from-stats``).
    """
    from ream_modifiers.distributed import shard_for_rank

    args = job.calibration
    if args.dataset is None and args.mix is None:
        return None, {"from_statistics": job.statistics.from_stats}
    calibration, calibration_info = _calibration_rows(tokenizer, args)
    if job.statistics.from_stats is not None:
        calibration_info["from_statistics"] = job.statistics.from_stats
    # under torchrun each rank calibrates on its own share of the rows
    shard = shard_for_rank(calibration)
    if args.images is not None:
        # per share, so that every rank's first row (which llm-compressor
        # traces the model with) carries an image
        shard = _add_image_rows(moe_model, tokenizer, shard, job)
        calibration_info["images"] = args.images
        calibration_info["image_rows_per_rank"] = sum(
            row is not None for row in shard["pixel_values"]
        )
    return shard, calibration_info


def _calibration_rows(
    tokenizer, args: CalibrationArguments
) -> tuple[Any, dict[str, Any]]:
    """The calibration dataset and what ``calibration.json`` says of it."""
    from ream_modifiers.data import build_calibration_dataset, build_mix

    logger.info(f"Building {args.num_samples} x {args.max_seq_len} calibration rows")
    if args.mix is not None:
        options = {"sources": args.mix_sources, "seed": args.seed}
        options |= {"packing": args.packing, "chat_template": args.chat_template}
        rows = (args.num_samples, args.max_seq_len)
        calibration, mix_report = build_mix(tokenizer, args.mix, *rows, **options)
        return calibration, mix_report.to_dict()
    calibration = build_calibration_dataset(
        args.dataset,
        tokenizer,
        args.num_samples,
        args.max_seq_len,
        text_field=args.text_field,
    )
    info = {
        "source": args.dataset,
        "rows": len(calibration),
        "max_seq_length": args.max_seq_len,
    }
    return calibration, info


def _add_image_rows(moe_model, tokenizer, calibration, job: CompressJob):
    """Replace ``--image-fraction`` of this rank's text rows by image rows."""
    from torch import distributed as dist

    from ream_modifiers.data.images import (
        build_image_rows,
        load_image_processor,
        with_image_rows,
    )
    from ream_modifiers.distributed import is_distributed

    args = job.calibration
    rank = dist.get_rank() if is_distributed() else 0
    count = max(1, round(args.image_fraction * len(calibration)))
    logger.info(f"Building {count} image+caption calibration rows ({args.images})")
    image_processor = load_image_processor(job.model.model, job.model.trust_remote_code)
    rows = build_image_rows(
        moe_model.config,
        tokenizer,
        image_processor,
        args.images,
        count,
        args.max_seq_len,
        seed=args.seed + rank,  # each rank its own order of the images
    )
    return with_image_rows(calibration, rows)


def _publish(
    partial: Path,
    job: CompressJob,
    reports: list[dict],
    summary: CompressionSummary,
    calibration_info: dict[str, Any],
) -> None:
    """Write the totals, check the staged checkpoint, then its card."""
    from ream_modifiers.check import check_checkpoint
    from ream_modifiers.processor_files import copy_processor_files

    copy_processor_files(job.model.model, partial)
    (partial / SUMMARY_FILENAME).write_text(
        json.dumps(asdict(summary), indent=2) + "\n"
    )
    (partial / CALIBRATION_FILENAME).write_text(
        json.dumps(calibration_info, indent=2) + "\n"
    )
    check = check_checkpoint(partial)
    served = ""
    if job.output.check_vllm and check.ok:
        from ream_modifiers.check.vllm_probe import probe_vllm

        logger.info("Loading the checkpoint in vLLM (--check-vllm)")
        probe = probe_vllm(partial, job.output.vllm_python)
        check.record_vllm(probe.ok, probe.describe())
        served = f" {probe.describe()}."
    check.raise_for_violations()
    logger.info(f"Checkpoint check passed: {check.describe()}{served}")
    write_provenance(
        partial,
        model=job.model.model,
        output=job.output.output,
        reports=reports,
        summary=summary,
        calibration=calibration_info,
        check=f"`ream-compress check` passed ({check.describe()}).{served}",
        trust_remote_code=job.model.trust_remote_code,
        command=job.output.command,
    )


def _run_oneshot(
    moe_model, recipe_path: Path, output: Path, calibration, tokenizer, job: CompressJob
) -> None:
    """
    One ``oneshot`` of the recipe; or, with sequential targets and modifiers
    after the expert reduction, two: the reduction with decoder-layer subgraphs,
    then the rest with the given targets, saved together with the whole recipe.
    """
    from llmcompressor import oneshot
    from llmcompressor.recipe import Recipe

    from ream_modifiers.modifiers.sequential import split_at_expert_reduction

    pipeline = job.pipeline
    common = oneshot_data(calibration, tokenizer, job)
    if not pipeline.sequential_targets:
        oneshot(
            model=moe_model, recipe=str(recipe_path), output_dir=str(output), **common
        )
        return
    recipe = Recipe.create_instance(str(recipe_path))
    reduction, rest = split_at_expert_reduction(recipe.modifiers)
    if reduction and rest:
        _two_passes(moe_model, recipe, reduction, rest, output, pipeline, common)
        return
    if reduction:
        logger.warning(
            f"--sequential-targets {pipeline.sequential_targets} not used: they "
            "apply to the modifiers after the expert reduction, and the recipe has "
            "none"
        )
    targets = {} if reduction else _targets(pipeline)
    oneshot(model=moe_model, recipe=recipe, output_dir=str(output), **common, **targets)


def oneshot_data(calibration, tokenizer, job: CompressJob) -> dict[str, Any]:
    """``oneshot``'s data arguments for this rank's calibration rows (None:
    the recipe needs no data)."""
    from ream_modifiers.data.images import collate_calibration_row

    data = dict(
        dataset=calibration,
        processor=tokenizer,
        num_calibration_samples=0 if calibration is None else len(calibration),
        max_seq_length=job.calibration.max_seq_len,
        moe_calibrate_all_experts=job.calibration.calibrate_all_experts,
    )
    if job.calibration.images is not None:
        # rows with pixel values and their patch grid, one per batch
        data["data_collator"] = collate_calibration_row
    return data


def _targets(pipeline: PipelineArguments) -> dict[str, Any]:
    return dict(
        sequential_targets=pipeline.sequential_targets,
        sequential_targets_per_subgraph=pipeline.sequential_targets_per_subgraph,
    )


def _two_passes(moe_model, recipe, reduction, rest, output, pipeline, common) -> None:
    """The expert reduction on whole decoder layers, then the rest on targets."""
    from llmcompressor import oneshot

    from ream_modifiers.modifiers.sequential import protect_routers

    logger.info(
        f"Two calibration passes: {[type(m).__name__ for m in reduction]} with "
        f"decoder-layer subgraphs, then {[type(m).__name__ for m in rest]} with "
        f"sequential targets {pipeline.sequential_targets} "
        f"({pipeline.sequential_targets_per_subgraph} per subgraph)"
    )
    protect_routers(moe_model, reduction, rest)
    oneshot(model=moe_model, recipe=reduction, **common)
    oneshot(
        model=moe_model,
        recipe=rest,
        output_dir=str(output),
        **common,
        **_targets(pipeline),
    )
    # the save wrote only the second pass's modifiers
    recipe.yaml(file_path=str(output / "recipe.yaml"))
