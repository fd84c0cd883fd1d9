"""
:func:`compress`: the whole run, refusing bad input before the model loads.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from loguru import logger

from ream_modifiers.cli.args import CompressJob
from ream_modifiers.cli.summary import CompressionSummary
from ream_modifiers.errors import InputError
from ream_modifiers.output import refuse_existing

__all__ = ["compress"]


def compress(
    recipe: str,
    model: str,
    dataset: str | None,
    output: str,
    **options: Any,
) -> CompressionSummary | None:
    """
    Compress ``model`` with ``recipe`` into ``output``. The output is written to
    ``.<name>.tmp-<pid>`` beside ``output``, checked with
    :func:`ream_modifiers.check.check_checkpoint`, and renamed into place only if
    the check passes, so ``output`` is either complete and valid or absent.

    ``options`` are the fields of the argument groups in
    :mod:`ream_modifiers.cli.args`, by name (the CLI options without ``--``):
    :class:`~ream_modifiers.cli.args.ModelArguments` (``dtype``,
    ``trust_remote_code``), :class:`~ream_modifiers.cli.args.CalibrationArguments`
    (``mix``, ``mix_sources``, ``num_samples``, ``max_seq_len``, ``text_field``,
    ``packing``, ``chat_template``, ``seed``, ``calibrate_all_experts``,
    ``images``, ``image_fraction``),
    :class:`~ream_modifiers.cli.args.PipelineArguments` (``offload``,
    ``offload_folder``, ``sequential_targets``,
    ``sequential_targets_per_subgraph``) and
    :class:`~ream_modifiers.cli.args.OutputArguments` (``overwrite``,
    ``check_vllm``, ``vllm_python``, ``command``).

    Calibration text comes from ``dataset`` (one source), or from a general /
    math / code ``mix`` such as ``"general=0.2,math=0.3,code=0.5"`` (see
    :func:`ream_modifiers.data.build_mix`). Beside the checkpoint, the output
    holds ``recipe.yaml``, the per-layer report ``expert_reduction.json``,
    ``compression_summary.json``, ``calibration.json``, a model card
    ``README.md`` and, with matplotlib, ``expert_saliency.png``.

    Larger than memory: ``offload`` keeps the weights in CPU memory (``cpu``), on
    disk in ``offload_folder`` (``disk``), or in CPU memory first and the rest on
    disk (``auto``); the folder must be empty or new and is emptied at the end.
    ``sequential_targets`` set the subgraphs of the modifiers after the expert
    reduction (GPTQ); the reduction then runs first in its own oneshot with
    decoder-layer subgraphs.

    Under ``torchrun --nproc_per_node N`` every rank runs this function: each
    calibrates on its share of the rows, statistics are reduced onto the source
    rank, which decides, writes and checks the output and returns the summary;
    the other ranks return None.

    :raises ream_modifiers.errors.InputError: before the model is loaded, if the
        recipe would run as less than it says (``RecipeError``: keys
        llm-compressor skips, an unknown class or field, no expert reduction),
        a local model path does not exist or its weight files are truncated or
        corrupt (``ModelFileError``), its config has no usable routing
        (``ModelConfigError``), an expert budget does not fit the model
        (``ExpertBudgetError``), the calibration data holds no text
        (``CalibrationDataError``) or an option cannot work; after it loads and
        before calibration, if a quantization group size does not divide a
        targeted layer
    :raises ream_modifiers.check.CheckpointCheckError: if the written checkpoint
        breaks a rule vLLM depends on, or vLLM refuses it (nothing is written to
        ``output`` then)
    :raises TypeError: for an option no argument group has
    """
    job = CompressJob.from_options(
        recipe, model=model, dataset=dataset, output=output, **options
    )
    return run_job(job)


def run_job(job: CompressJob) -> CompressionSummary | None:
    """Run a :class:`CompressJob` (see :func:`compress`)."""
    from ream_modifiers.cli.run import compress_loaded_model
    from ream_modifiers.cli.statistics_options import recipe_with_statistics
    from ream_modifiers.distributed import init_distributed
    from ream_modifiers.resources import resolve_recipe

    init_distributed()  # a no-op unless started by torchrun
    recipe_path = recipe_with_statistics(resolve_recipe(job.recipe), job.statistics)
    _check_options(job)
    modifiers = _check_before_loading(job, recipe_path)
    start = time.perf_counter()
    with offload_folder_cleared(job):
        moe_model, tokenizer = _load(job, modifiers)
        summary = compress_loaded_model(moe_model, tokenizer, recipe_path, job, start)
    if summary is None:  # not the source rank of a torchrun job
        return None
    lines = ["", "== ream-compress summary ==", *summary.lines()]
    print("\n".join([*lines, f"output           {job.output.output}"]))
    return summary


def _check_options(job: CompressJob) -> None:
    """Options that cannot work together, before anything is read."""
    from ream_modifiers.moe.offload import OffloadOptionError, check_offload_options

    calibration, pipeline = job.calibration, job.pipeline
    given = (calibration.dataset is not None) + (calibration.mix is not None)
    if given != 1 and not (given == 0 and job.statistics.from_stats is not None):
        raise InputError(
            "give exactly one of --dataset and --mix",
            "--dataset bundled (or a file, folder or dataset ID), or --mix "
            "general=0.5,code=0.5",
        )
    try:
        check_offload_options(pipeline.offload, pipeline.offload_folder)
    except OffloadOptionError as error:
        raise InputError(
            str(error), "see --offload and --offload-folder in --help"
        ) from None
    if pipeline.sequential_targets_per_subgraph < 1:
        raise InputError(
            "--sequential-targets-per-subgraph must be >= 1",
            "pass a positive count (1, the default, is one target per subgraph)",
        )
    for flag, value in (
        ("--num-samples", calibration.num_samples),
        ("--max-seq-len", calibration.max_seq_len),
    ):
        if value < 1:
            raise InputError(
                f"{flag} must be >= 1, got {value}",
                f"pass a positive {flag} (e.g. --num-samples 512 --max-seq-len 2048)",
            )
    if not 0 < calibration.image_fraction <= 1:
        raise InputError(
            f"--image-fraction must be in (0, 1], got {calibration.image_fraction}",
            "pass the share of rows that carry an image, e.g. --image-fraction 0.25",
        )
    if job.output.check_vllm:
        from ream_modifiers.check.vllm_probe import VllmUnavailableError, require_vllm

        try:
            require_vllm(job.output.vllm_python)
        except VllmUnavailableError as error:
            raise InputError(
                f"--check-vllm: {error}", "install vLLM or pass --vllm-python"
            ) from None
    refuse_existing(Path(job.output.output), job.output.overwrite)


def _check_before_loading(job: CompressJob, recipe_path: Path) -> list:
    """
    The checks that read the recipe, the model's files and the calibration
    data, so that what would fail after the weights load (minutes, for a large
    model) fails before it.

    :return: the parsed recipe's modifiers
    """
    from ream_modifiers.budget_check import check_expert_budget
    from ream_modifiers.data.calibration import check_calibration_source
    from ream_modifiers.data.mix import check_mix
    from ream_modifiers.errors import check_model_source
    from ream_modifiers.model_files import check_model_files
    from ream_modifiers.quantized_source import check_unquantized_source
    from ream_modifiers.recipe_check import load_checked_recipe

    # a typo, or keys llm-compressor would skip, fail before anything loads
    modifiers = load_checked_recipe(recipe_path).modifiers
    model = job.model.model
    check_model_source(model)
    # headers only: a cut or garbled shard fails here, not inside from_pretrained
    check_model_files(model)
    # packed INT4/NVFP4 experts would fail only after the model has loaded
    check_unquantized_source(model, job.model.trust_remote_code)
    # from config.json: a budget the model cannot meet fails before it loads
    check_expert_budget(model, modifiers, recipe_path, job.model.trust_remote_code)
    calibration = job.calibration
    if calibration.dataset is None and calibration.mix is None:  # --from-stats
        _check_no_calibration_needed(modifiers)
        calibration.images = None
        return modifiers
    if calibration.mix is not None:
        check_mix(calibration.mix, calibration.mix_sources)
    else:
        check_calibration_source(calibration.dataset, calibration.text_field)
    calibration.images = _resolve_images(job)
    return modifiers


def _check_no_calibration_needed(modifiers: list) -> None:
    """With --from-stats and no data, no other modifier may need calibration."""
    calibrating = [type(m).__name__ for m in modifiers if m.requires_calibration_data]
    if calibrating:
        raise InputError(
            f"--from-stats decides the expert reduction without data, but "
            f"{calibrating} in the recipe calibrate",
            "give --dataset (or --mix) for them, or use a recipe without them",
        )


def _resolve_images(job: CompressJob) -> str | None:
    """
    The image source of the calibration rows (None: text only); an asked-for
    source needs a vision-language model with an image processor.
    """
    from transformers import AutoConfig, AutoTokenizer

    from ream_modifiers.data.images import (
        ImageCalibrationError,
        build_image_rows,
        captioned_images,
        check_image_calibration,
        load_image_processor,
    )

    images = job.calibration.images
    if images in (None, "none"):
        return None
    args = job.model
    config = AutoConfig.from_pretrained(
        args.model, trust_remote_code=args.trust_remote_code
    )

    def check(source: str) -> None:
        check_image_calibration(config, source)
        processor = load_image_processor(args.model, args.trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(
            args.model, trust_remote_code=args.trust_remote_code
        )
        # every image once: one that does not fit a row fails here
        count = len(captioned_images(source))
        max_seq_len = job.calibration.max_seq_len
        build_image_rows(config, tokenizer, processor, source, count, max_seq_len)

    if images != "auto":
        check(images)
        return images
    if getattr(config, "vision_config", None) is None:
        return None
    try:
        check("bundled")
    except ImageCalibrationError as error:
        logger.warning(
            f"Calibrating {config.model_type} on text only, so the experts that "
            f"serve image tokens see none: {error.problem}"
        )
        return None
    logger.info("Vision-language model: the bundled images go into calibration")
    return "bundled"


def _load(job: CompressJob, modifiers: list):
    """The tokenizer and the model, then the checks that need its layers."""
    import torch
    from transformers import AutoTokenizer

    from ream_modifiers.moe.load import load_moe_model
    from ream_modifiers.quant_check import check_group_sizes

    args = job.model
    logger.info(f"Loading {args.model}")
    if args.trust_remote_code:
        logger.warning(f"Running the modelling code shipped with {args.model}")
    tokenizer = AutoTokenizer.from_pretrained(
        args.model, trust_remote_code=args.trust_remote_code
    )
    moe_model = load_moe_model(
        args.model,
        dtype=args.dtype if args.dtype == "auto" else getattr(torch, args.dtype),
        trust_remote_code=args.trust_remote_code,
        offload=job.pipeline.offload,
        offload_folder=job.pipeline.offload_folder,
    )
    # before calibration: GPTQ would fail on these only after the reduction
    check_group_sizes(moe_model, modifiers)
    return moe_model, tokenizer


@contextmanager
def offload_folder_cleared(job: CompressJob) -> Iterator[None]:
    """Empty ``--offload-folder`` when the run ends, however it ends (and
    remove it if the run created it)."""
    folder = job.pipeline.offload_folder
    folder = None if folder is None else Path(folder)
    existed = folder is not None and folder.exists()
    try:
        yield
    finally:
        if folder is not None:
            # only compressed-tensors' scratch files (links into the checkpoint,
            # changed tensors) are in it: the folder was empty or new
            _clear_folder(folder, remove=not existed)


def _clear_folder(folder: Path, remove: bool) -> None:
    if not folder.is_dir():
        return
    if remove:
        shutil.rmtree(folder, ignore_errors=True)
        return
    for entry in folder.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
