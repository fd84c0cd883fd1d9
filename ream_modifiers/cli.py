"""
``ream-compress``: run a recipe on a Hugging Face MoE model and write a
compressed-tensors checkpoint, its tokenizer and the per-layer report.

    ream-compress compress recipes/reap_w4a16.yaml --model Qwen/Qwen3-30B-A3B \\
        --dataset c4 --num-samples 512 --max-seq-len 2048 --output out/
    ream-compress demo
    ream-compress check out/
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from loguru import logger

from ream_modifiers.errors import InputError
from ream_modifiers.output import refuse_existing, shared_staged_output

__all__ = ["main", "compress", "CompressionSummary"]

REPO_ROOT = Path(__file__).resolve().parents[1]
REPO_RECIPES = REPO_ROOT / "recipes"
FIXTURE = REPO_ROOT / "benchmarks" / "fixture"
SUMMARY_FILENAME = "compression_summary.json"
CALIBRATION_FILENAME = "calibration.json"


@dataclass
class CompressionSummary:
    model: str
    recipe: str
    experts_per_layer_before: int | None
    experts_per_layer_after: int | None
    moe_layers: int
    parameters_before: int
    parameters_after: int
    gib_before: float
    gib_after: float
    seconds: float

    def lines(self) -> list[str]:
        return [
            f"model            {self.model}",
            f"recipe           {self.recipe}",
            f"experts/layer    {self.experts_per_layer_before} -> "
            f"{self.experts_per_layer_after} ({self.moe_layers} MoE layers)",
            f"parameters       {self.parameters_before:,} -> {self.parameters_after:,}",
            f"size (GiB)       {self.gib_before:.4f} -> {self.gib_after:.4f} "
            f"({self.gib_after / self.gib_before:.1%})",
            f"time             {self.seconds:.1f} s",
        ]


def resolve_recipe(recipe: str) -> Path:
    """A recipe path, or the name of one in the repository's ``recipes/``."""
    path = Path(recipe)
    if path.is_file():
        return path
    for candidate in (REPO_RECIPES / recipe, REPO_RECIPES / f"{recipe}.yaml"):
        if candidate.is_file():
            return candidate
    known = sorted(p.stem for p in REPO_RECIPES.glob("*.yaml"))
    raise InputError(
        f"recipe {recipe!r} not found; known recipes: {known}",
        "give a recipe file's path or a known recipe's name",
    )


def _checkpoint_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.glob("*.safetensors"))


def _checkpoint_parameters(directory: Path) -> int:
    """Logical parameter count of a saved (possibly packed) checkpoint."""
    from safetensors import safe_open

    total = 0
    for file in directory.glob("*.safetensors"):
        with safe_open(file, "pt") as handle:
            for name in handle.keys():
                if name.endswith("weight_shape"):  # a packed weight's logical shape
                    total += math.prod(handle.get_tensor(name).tolist())
                elif name.endswith(("weight", "bias")):
                    total += math.prod(handle.get_slice(name).get_shape())
    return total


def compress(
    recipe: str,
    model: str,
    dataset: str | None,
    output: str,
    num_samples: int = 512,
    max_seq_len: int = 2048,
    dtype: str = "auto",
    text_field: str = "text",
    overwrite: bool = False,
    calibrate_all_experts: bool = True,
    mix: str | None = None,
    mix_sources: dict[str, str] | None = None,
    packing: bool = True,
    chat_template: bool = False,
    seed: int = 42,
    trust_remote_code: bool = False,
    command: str | None = None,
    offload: str = "none",
    offload_folder: str | None = None,
    sequential_targets: list[str] | None = None,
    sequential_targets_per_subgraph: int = 1,
    check_vllm: bool = False,
    vllm_python: str | None = None,
) -> CompressionSummary | None:
    """
    Compress ``model`` with ``recipe`` into ``output``. The output is written to
    ``.<name>.tmp-<pid>`` beside ``output``, checked with
    :func:`ream_modifiers.check.check_checkpoint`, and renamed into place only if
    the check passes, so ``output`` is either complete and valid or absent.

    Calibration text comes from ``dataset`` (one source), or from a general / math
    / code ``mix`` such as ``"general=0.2,math=0.3,code=0.5"`` (see
    :func:`ream_modifiers.data.build_mix`), whose per-source counts are written to
    ``calibration.json``.

    Beside the checkpoint, the output holds ``recipe.yaml``, the per-layer report
    ``expert_reduction.json``, ``compression_summary.json``, ``calibration.json``,
    a model card ``README.md`` and, with matplotlib, ``expert_saliency.png``.

    Larger than memory: ``offload`` keeps the weights in CPU memory (``cpu``), on
    disk in ``offload_folder`` (``disk``), or in CPU memory first and the rest on
    disk (``auto``), and llm-compressor's sequential pipeline onloads one decoder
    layer at a time; the folder must be empty or new and is emptied at the end.
    ``sequential_targets`` (e.g. ``["Qwen3MoeAttention", "ExpertMLP"]``) and
    ``sequential_targets_per_subgraph`` set the subgraphs of the modifiers after
    the expert reduction (GPTQ); the reduction needs whole MoE blocks, so it then
    runs first in its own oneshot with decoder-layer subgraphs.

    Under ``torchrun --nproc_per_node N`` every rank runs this function: each
    calibrates on its share of the rows, statistics are reduced onto the source
    rank, which decides, writes and checks the output and returns the summary;
    the other ranks return None.

    :param overwrite: replace a non-empty ``output``
    :param trust_remote_code: run modelling code shipped with the model
    :param command: the command line, quoted in the model card
    :param offload: ``none``, ``cpu``, ``disk`` or ``auto``
    :param offload_folder: folder for ``disk`` and ``auto`` offloading
    :param sequential_targets: module classes or names, one subgraph each
    :param sequential_targets_per_subgraph: targets per subgraph
    :param check_vllm: also load the result in vLLM with strict weight tracking
        and generate a few tokens before publishing it (vLLM must be importable
        by ``vllm_python``, checked before calibration; on a GPU it needs the
        memory this process no longer holds)
    :param vllm_python: interpreter with vLLM for ``check_vllm``; this one by
        default
    :raises ream_modifiers.errors.InputError: before the model is loaded, if the
        recipe would run as less than it says (``RecipeError``: keys
        llm-compressor skips, an unknown class or field, no expert reduction)
        or a local model path does not exist
    :raises ream_modifiers.check.CheckpointCheckError: if the written checkpoint
        breaks a rule vLLM depends on, or vLLM refuses it (nothing is written to
        ``output`` then)
    """
    from transformers import AutoTokenizer

    import ream_modifiers  # noqa: F401  (registers the modifiers)
    from ream_modifiers.distributed import init_distributed
    from ream_modifiers.errors import check_model_source
    from ream_modifiers.moe import load_moe_model
    from ream_modifiers.moe.offload import OffloadOptionError, check_offload_options
    from ream_modifiers.quant_check import check_group_sizes
    from ream_modifiers.recipe_check import load_checked_recipe

    recipe_path = resolve_recipe(recipe)
    init_distributed()  # a no-op unless started by torchrun
    if (dataset is None) == (mix is None):
        raise InputError(
            "give exactly one of --dataset and --mix",
            "--dataset bundled (or a file, folder or dataset ID), or --mix "
            "general=0.5,code=0.5",
        )
    try:
        check_offload_options(offload, offload_folder)
    except OffloadOptionError as error:
        raise InputError(
            str(error), "see --offload and --offload-folder in --help"
        ) from None
    if sequential_targets_per_subgraph < 1:
        raise InputError(
            "--sequential-targets-per-subgraph must be >= 1",
            "pass a positive count (1, the default, is one target per subgraph)",
        )
    if check_vllm:
        from ream_modifiers.check.vllm_probe import VllmUnavailableError, require_vllm

        try:
            require_vllm(vllm_python)
        except VllmUnavailableError as error:
            raise InputError(
                f"--check-vllm: {error}", "install vLLM or pass --vllm-python"
            ) from None
    output_dir = Path(output)
    refuse_existing(output_dir, overwrite)
    # parse the recipe now: a typo, or keys llm-compressor would skip, must fail
    # before the model is even loaded
    recipe_modifiers = load_checked_recipe(recipe_path).modifiers
    check_model_source(str(model))

    start = time.perf_counter()
    logger.info(f"Loading {model}")
    if trust_remote_code:
        logger.warning(f"Running the modelling code shipped with {model}")
    tokenizer = AutoTokenizer.from_pretrained(
        model, trust_remote_code=trust_remote_code
    )
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    folder = None if offload_folder is None else Path(offload_folder)
    folder_existed = folder is not None and folder.exists()
    try:
        moe_model = load_moe_model(
            model,
            dtype=torch_dtype,
            trust_remote_code=trust_remote_code,
            offload=offload,
            offload_folder=offload_folder,
        )
        # before calibration: GPTQ would fail on these only after the reduction
        check_group_sizes(moe_model, recipe_modifiers)
        summary = _compress_model(
            moe_model,
            tokenizer,
            recipe_path,
            model=model,
            dataset=dataset,
            output_dir=output_dir,
            num_samples=num_samples,
            max_seq_len=max_seq_len,
            text_field=text_field,
            overwrite=overwrite,
            calibrate_all_experts=calibrate_all_experts,
            mix=mix,
            mix_sources=mix_sources,
            packing=packing,
            chat_template=chat_template,
            seed=seed,
            trust_remote_code=trust_remote_code,
            command=command,
            sequential_targets=sequential_targets,
            sequential_targets_per_subgraph=sequential_targets_per_subgraph,
            start=start,
            check_vllm=check_vllm,
            vllm_python=vllm_python,
        )
    finally:
        if folder is not None:
            # only compressed-tensors' scratch files (links into the checkpoint,
            # changed tensors) are in it: the folder was empty or new
            _clear_folder(folder, remove=not folder_existed)
    if summary is None:  # not the source rank of a torchrun job
        return None
    print(
        "\n".join(
            [
                "",
                "== ream-compress summary ==",
                *summary.lines(),
                f"output           {output_dir}",
            ]
        )
    )
    return summary


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


def _compress_model(
    moe_model,
    tokenizer,
    recipe_path: Path,
    *,
    model: str,
    dataset: str | None,
    output_dir: Path,
    num_samples: int,
    max_seq_len: int,
    text_field: str,
    overwrite: bool,
    calibrate_all_experts: bool,
    mix: str | None,
    mix_sources: dict[str, str] | None,
    packing: bool,
    chat_template: bool,
    seed: int,
    trust_remote_code: bool,
    command: str | None,
    sequential_targets: list[str] | None,
    sequential_targets_per_subgraph: int,
    start: float,
    check_vllm: bool = False,
    vllm_python: str | None = None,
) -> CompressionSummary | None:
    """Calibrate, compress, check and publish a loaded model (see :func:`compress`)."""
    from ream_modifiers.check import check_checkpoint
    from ream_modifiers.data import build_calibration_dataset, build_mix
    from ream_modifiers.distributed import barrier, is_source_process, shard_for_rank
    from ream_modifiers.moe import find_moe_layers
    from ream_modifiers.moe.offload import parameter_totals
    from ream_modifiers.saving import REPORT_FILENAME

    layers = find_moe_layers(moe_model)
    experts_before = layers[0].num_experts
    # counted without onloading: an offloaded model is not read back for this
    parameters_before, bytes_before = parameter_totals(moe_model)
    logger.info(f"Building {num_samples} x {max_seq_len} calibration rows")
    if mix is not None:
        calibration, mix_report = build_mix(
            tokenizer,
            mix,
            num_samples,
            max_seq_len,
            sources=mix_sources,
            packing=packing,
            chat_template=chat_template,
            seed=seed,
        )
        calibration_info = mix_report.to_dict()
    else:
        calibration = build_calibration_dataset(
            dataset, tokenizer, num_samples, max_seq_len, text_field=text_field
        )
        calibration_info = {
            "source": dataset,
            "rows": len(calibration),
            "max_seq_length": max_seq_len,
        }

    # under torchrun each rank calibrates on its own share of the rows
    shard = shard_for_rank(calibration)
    with shared_staged_output(output_dir, overwrite) as partial:
        _run_oneshot(
            moe_model,
            recipe_path,
            partial,
            calibration=shard,
            tokenizer=tokenizer,
            num_samples=len(shard),
            max_seq_len=max_seq_len,
            calibrate_all_experts=calibrate_all_experts,
            sequential_targets=sequential_targets,
            sequential_targets_per_subgraph=sequential_targets_per_subgraph,
        )
        barrier()  # every rank's part of the save is on disk
        if not is_source_process():
            return None
        report_file = partial / REPORT_FILENAME
        reports = json.loads(report_file.read_text()) if report_file.exists() else []
        summary = CompressionSummary(
            model=str(model),
            recipe=str(recipe_path),
            experts_per_layer_before=experts_before,
            experts_per_layer_after=reports[-1]["num_experts_after"]
            if reports
            else None,
            moe_layers=len(layers),
            parameters_before=parameters_before,
            parameters_after=_checkpoint_parameters(partial),
            gib_before=bytes_before / 2**30,
            gib_after=_checkpoint_bytes(partial) / 2**30,
            seconds=time.perf_counter() - start,
        )
        (partial / SUMMARY_FILENAME).write_text(
            json.dumps(asdict(summary), indent=2) + "\n"
        )
        (partial / CALIBRATION_FILENAME).write_text(
            json.dumps(calibration_info, indent=2) + "\n"
        )
        check = check_checkpoint(partial)
        served = ""
        if check_vllm and check.ok:
            from ream_modifiers.check.vllm_probe import probe_vllm

            logger.info("Loading the checkpoint in vLLM (--check-vllm)")
            probe = probe_vllm(partial, vllm_python)
            check.record_vllm(probe.ok, probe.describe())
            served = f" {probe.describe()}."
        check.raise_for_violations()
        logger.info(f"Checkpoint check passed: {check.describe()}{served}")
        _write_provenance(
            partial,
            model=str(model),
            output=str(output_dir),
            reports=reports,
            summary=summary,
            calibration=calibration_info,
            check=f"`ream-compress check` passed ({check.describe()}).{served}",
            trust_remote_code=trust_remote_code,
            command=command,
        )
    return summary


def _run_oneshot(
    moe_model,
    recipe_path: Path,
    output: Path,
    *,
    calibration,
    tokenizer,
    num_samples: int,
    max_seq_len: int,
    calibrate_all_experts: bool,
    sequential_targets: list[str] | None,
    sequential_targets_per_subgraph: int,
) -> None:
    """
    One ``oneshot`` of the recipe; or, with ``sequential_targets`` and modifiers
    after the expert reduction, two: the reduction with decoder-layer subgraphs,
    then the rest with the given targets, saved together with the whole recipe.
    """
    from llmcompressor import oneshot
    from llmcompressor.recipe import Recipe

    from ream_modifiers.modifiers.sequential import (
        protect_routers,
        split_at_expert_reduction,
    )

    common = dict(
        dataset=calibration,
        processor=tokenizer,
        num_calibration_samples=num_samples,
        max_seq_length=max_seq_len,
        moe_calibrate_all_experts=calibrate_all_experts,
    )
    targets = dict(
        sequential_targets=sequential_targets,
        sequential_targets_per_subgraph=sequential_targets_per_subgraph,
    )
    if not sequential_targets:
        oneshot(
            model=moe_model, recipe=str(recipe_path), output_dir=str(output), **common
        )
        return
    recipe = Recipe.create_instance(str(recipe_path))
    reduction, rest = split_at_expert_reduction(recipe.modifiers)
    if not reduction:
        oneshot(
            model=moe_model, recipe=recipe, output_dir=str(output), **common, **targets
        )
        return
    if not rest:
        logger.warning(
            f"--sequential-targets {sequential_targets} not used: they apply to the "
            "modifiers after the expert reduction, and the recipe has none"
        )
        oneshot(model=moe_model, recipe=recipe, output_dir=str(output), **common)
        return
    logger.info(
        f"Two calibration passes: {[type(m).__name__ for m in reduction]} with "
        f"decoder-layer subgraphs, then {[type(m).__name__ for m in rest]} with "
        f"sequential targets {sequential_targets} "
        f"({sequential_targets_per_subgraph} per subgraph)"
    )
    protect_routers(moe_model, reduction, rest)
    oneshot(model=moe_model, recipe=reduction, **common)
    oneshot(model=moe_model, recipe=rest, output_dir=str(output), **common, **targets)
    # the save wrote only the second pass's modifiers
    recipe.yaml(file_path=str(output / "recipe.yaml"))


def _write_provenance(
    directory: Path,
    *,
    model: str,
    output: str,
    reports: list[dict],
    summary: CompressionSummary,
    calibration: dict,
    check: str,
    trust_remote_code: bool,
    command: str | None,
) -> None:
    """The model card and the per-layer figure (skipped without matplotlib)."""
    from ream_modifiers.card import CardInputs, write_card
    from ream_modifiers.plot import PLOT_FILENAME, write_expert_plot

    plot = write_expert_plot(reports, directory / PLOT_FILENAME)
    recipe_file = directory / "recipe.yaml"
    inputs = CardInputs(
        model=model,
        output=output,
        reports=reports,
        summary=asdict(summary),
        calibration=calibration,
        config=json.loads((directory / "config.json").read_text()),
        recipe_yaml=recipe_file.read_text() if recipe_file.is_file() else "",
        command=command,
        check=check,
        trust_remote_code=trust_remote_code,
        plot=plot is not None,
    )
    write_card(inputs, directory)


def _previous_output(path: Path) -> bool:
    return (path / SUMMARY_FILENAME).is_file()


def demo(
    output: str = "demo-output", recipe: str = "reap_w4a16", overwrite: bool = False
):
    """
    The whole path on the embedded default: the trained fixture MoE shipped in
    ``benchmarks/fixture/model`` (Qwen3-MoE, 32 experts, top-4; a small random
    Qwen3-MoE is built instead where the repository's benchmarks are absent),
    the bundled calibration text and a recipe; then reload the checkpoint with
    transformers and print held-out perplexity per domain before and after.

    :param overwrite: replace a non-empty ``output``; an earlier ream-compress
        output there is replaced anyway, so the demo can be run again
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ream_modifiers.evaluation import perplexity, read_jsonl_texts
    from ream_modifiers.tiny import build_tiny_moe

    overwrite = overwrite or _previous_output(Path(output))
    refuse_existing(Path(output), overwrite)
    with tempfile.TemporaryDirectory(prefix="ream-demo-model-") as scratch:
        model_dir = FIXTURE / "model"
        if not (model_dir / "config.json").is_file():
            logger.warning(f"{model_dir} not found; using a random Qwen3-MoE instead")
            model_dir = build_tiny_moe(
                "qwen3_moe",
                scratch,
                num_hidden_layers=4,
                num_experts=16,
                num_experts_per_tok=4,
                dtype=torch.bfloat16,
            )
        heldout = {
            path.name.removesuffix("_heldout.jsonl"): read_jsonl_texts(path)
            for path in sorted((FIXTURE / "data").glob("*_heldout.jsonl"))
        }
        tokenizer = AutoTokenizer.from_pretrained(model_dir)

        def evaluate(path) -> dict[str, float]:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            return {d: perplexity(model, tokenizer, t) for d, t in heldout.items()}

        before = evaluate(model_dir)
        summary = compress(
            recipe,
            str(model_dir),
            "bundled",
            output,
            num_samples=64,
            max_seq_len=128,
            overwrite=overwrite,
        )
        after = evaluate(output)
    if heldout:
        print("\nheld-out perplexity   before -> after")
        for domain in heldout:
            print(
                f"  {domain:10s}         {before[domain]:8.2f} -> {after[domain]:8.2f}"
            )
        (Path(output) / "demo_perplexity.json").write_text(
            json.dumps({"before": before, "after": after}, indent=2) + "\n"
        )
    print(f"reloaded {output} with transformers")
    return summary


METHODS = {
    "REAPModifier": "REAP: prune lowest router-weighted activation saliency",
    "REAMModifier": "REAM: merge groups of experts after aligning neurons",
    "DERNModifier": "DERN: drop experts, recombine their neurons into kept ones",
    "AIMERModifier": "AIMER: data-free, prune by mean|w| / RMS(w)",
    "MoEITSModifier": "MoEITS: data-free, prune redundant experts (weight NMI)",
    "HCSMoEModifier": "HC-SMoE baseline: cluster mean outputs, average",
    "MSMoEModifier": "M-SMoE baseline: frequency-dominant experts, weight matching",
    "FrequencyPruningModifier": "frequency pruning baseline",
    "EANPruningModifier": "EAN pruning baseline",
}


def _methods_help() -> str:
    recipes = ", ".join(sorted(p.stem for p in REPO_RECIPES.glob("*.yaml")))
    lines = ["methods (recipe modifier names):"]
    lines += [f"  {name:26s}{text}" for name, text in METHODS.items()]
    lines.append(f"recipes in recipes/: {recipes}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ream-compress",
        description="Prune or merge MoE experts, then quantize, with a recipe.",
        epilog=_methods_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("compress", help="run a recipe on a model")
    run.add_argument(
        "recipe", help="recipe YAML path, or a name in recipes/ (reap_w4a16)"
    )
    run.add_argument(
        "--model", required=True, help="local path or Hugging Face model ID"
    )
    run.add_argument(
        "--dataset",
        help="calibration text: 'bundled', a local .txt/.jsonl file or folder, "
        "c4 / ultrachat / numinamath / the-stack-smol, or a Hugging Face dataset ID",
    )
    run.add_argument(
        "--mix",
        help="general/math/code mix instead of --dataset, e.g. "
        "general=0.2,math=0.3,code=0.5 (c4, NuminaMath-1.5, the-stack-smol)",
    )
    run.add_argument(
        "--mix-source",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="replace a mix source by a local .txt/.jsonl file or folder, or "
        "bundled:<domain> (repeatable)",
    )
    run.add_argument(
        "--no-packing",
        dest="packing",
        action="store_false",
        help="one document per row instead of packed rows",
    )
    run.add_argument(
        "--chat-template",
        action="store_true",
        help="wrap mix texts in the tokenizer's chat template",
    )
    run.add_argument("--seed", type=int, default=42, help="mix sampling seed")
    run.add_argument("--output", required=True, help="output directory")
    run.add_argument("--num-samples", type=int, default=512)
    run.add_argument("--max-seq-len", type=int, default=2048)
    run.add_argument(
        "--dtype", default="auto", help="auto, bfloat16, float16 or float32"
    )
    run.add_argument(
        "--text-field", default="text", help="text column of JSONL / HF data"
    )
    run.add_argument(
        "--overwrite", action="store_true", help="replace a non-empty output directory"
    )
    run.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run modelling code shipped with the model (off by default: only "
        "for models whose code you trust)",
    )
    run.add_argument(
        "--no-calibrate-all-experts",
        dest="calibrate_all_experts",
        action="store_false",
        help="run experts on routed tokens only (faster; REAP/AIMER do not need all)",
    )
    scale = run.add_argument_group(
        "larger than memory",
        "keep the weights off the execution device; llm-compressor's sequential "
        "pipeline onloads one decoder layer (plus its calibration activations) at "
        "a time",
    )
    scale.add_argument(
        "--offload",
        choices=["none", "cpu", "disk", "auto"],
        default="none",
        help="where the weights live: cpu memory, disk (--offload-folder), or auto "
        "(cpu memory up to what is free less 5 GB, the rest on disk)",
    )
    scale.add_argument(
        "--offload-folder",
        metavar="DIR",
        help="empty or new folder for --offload disk/auto (links to the checkpoint "
        "and changed weights; emptied at the end)",
    )
    scale.add_argument(
        "--sequential-targets",
        nargs="+",
        metavar="TARGET",
        help="subgraph targets of the modifiers after the expert reduction, e.g. "
        "Qwen3MoeAttention ExpertMLP for GPTQ per expert (the reduction runs "
        "first in its own pass with whole decoder layers)",
    )
    scale.add_argument(
        "--sequential-targets-per-subgraph",
        type=int,
        default=1,
        metavar="N",
        help="targets per subgraph with --sequential-targets (default 1)",
    )
    run.add_argument(
        "--check-vllm",
        action="store_true",
        help="before publishing, load the result in vLLM with strict weight "
        "tracking and generate a few tokens; the model card records the outcome",
    )
    run.add_argument(
        "--vllm-python",
        metavar="PYTHON",
        help="interpreter of an environment with vLLM for --check-vllm (default: "
        "this one)",
    )
    show = commands.add_parser("demo", help="compress a small locally built MoE")
    for command in (run, show):
        command.add_argument(
            "--verbose",
            action="store_true",
            help="keep llm-compressor's per-module logs (GPTQ prints a few lines "
            "for every Linear it quantizes)",
        )
    show.add_argument("--output", default="demo-output")
    show.add_argument("--recipe", default="reap_w4a16")
    show.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a non-empty output directory (an earlier demo output is "
        "replaced anyway)",
    )
    verify = commands.add_parser(
        "check",
        help="check that a checkpoint has what vLLM needs (reads config.json and "
        "safetensors headers only)",
    )
    verify.add_argument("directory", help="checkpoint directory")
    verify.add_argument(
        "--vllm",
        action="store_true",
        help="also load it in vLLM (strict weight tracking) and generate a few "
        "tokens; needs vLLM in this environment or --vllm-python",
    )
    verify.add_argument(
        "--vllm-python",
        metavar="PYTHON",
        help="interpreter of an environment with vLLM (default: this one)",
    )
    return parser


# llm-compressor modules that log per quantized module (hundreds of lines per
# decoder layer): kept to warnings and errors unless --verbose
_PER_MODULE_LOGGERS = (
    "llmcompressor.modifiers.gptq",
    "llmcompressor.modifiers.quantization",
    "llmcompressor.utils.metric_logging",
)


def quiet_library_logs() -> None:
    """
    llm-compressor's console log (stdout, its format and log-once filter),
    minus its per-module lines below WARNING: GPTQ's ``Quantizing ...`` and
    ``METRIC`` lines (METRIC sits at level 38, so a level alone would keep
    it). Left alone when ``LLM_COMPRESSOR_LOG_LEVEL`` or ``..._DISABLED`` is set.
    """
    from llmcompressor.logger import LoggerConfig, configure_logger, support_log_once

    if os.getenv("LLM_COMPRESSOR_LOG_LEVEL") or os.getenv(
        "LLM_COMPRESSOR_LOG_DISABLED"
    ):
        return

    def keep(record) -> bool:
        if not support_log_once(record):
            return False
        if not record["name"].startswith(_PER_MODULE_LOGGERS):
            return True
        return record["level"].name in ("WARNING", "ERROR", "CRITICAL")

    # clears the handlers and re-adds only the file log, if one is configured
    configure_logger(LoggerConfig(console_log_level=None))
    logger.add(
        sys.stdout,
        level="INFO",
        format="{time:YYYY-MM-DDTHH:mm:ss.SSSS} | {function} | {level} - {message}",
        filter=keep,
    )


def _check(directory: str, vllm: bool = False, vllm_python: str | None = None) -> int:
    from ream_modifiers.check import check_checkpoint
    from ream_modifiers.check.vllm_probe import VllmUnavailableError, probe_vllm

    report = check_checkpoint(directory)
    if vllm and report.ok:
        try:
            probe = probe_vllm(directory, vllm_python)
        except VllmUnavailableError as error:
            print(f"error: --vllm: {error}", file=sys.stderr)
            return 2
        report.record_vllm(probe.ok, probe.describe())
    print(report.summary(), file=sys.stdout if report.ok else sys.stderr)
    return 0 if report.ok else 1


def main(argv: list[str] | None = None) -> int:
    from ream_modifiers.check import CheckpointCheckError
    from ream_modifiers.errors import InputError

    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(argv)
    if args.command == "check":
        return _check(args.directory, args.vllm, args.vllm_python)
    if not args.verbose:
        quiet_library_logs()
    try:
        if args.command == "demo":
            demo(args.output, args.recipe, overwrite=args.overwrite)
            return 0
        return _compress(args, command=shlex.join(["ream-compress", *argv]))
    except InputError as error:
        print(f"error: {error.problem}\nfix: {error.fix}", file=sys.stderr)
        return 2
    except CheckpointCheckError as error:
        print(
            f"error: the compressed checkpoint failed the check, so nothing was "
            f"written to {args.output}:\n{error}",
            file=sys.stderr,
        )
        return 1


def _compress(args: argparse.Namespace, command: str) -> int:
    mix_sources = {}
    for item in args.mix_source:
        name, sep, path = item.partition("=")
        if not sep:
            raise InputError(
                f"--mix-source {item!r} is not NAME=PATH",
                "e.g. --mix-source code=data/",
            )
        mix_sources[name] = path
    compress(
        args.recipe,
        args.model,
        args.dataset,
        args.output,
        num_samples=args.num_samples,
        max_seq_len=args.max_seq_len,
        dtype=args.dtype,
        text_field=args.text_field,
        overwrite=args.overwrite,
        calibrate_all_experts=args.calibrate_all_experts,
        mix=args.mix,
        mix_sources=mix_sources,
        packing=args.packing,
        chat_template=args.chat_template,
        seed=args.seed,
        trust_remote_code=args.trust_remote_code,
        command=command,
        offload=args.offload,
        offload_folder=args.offload_folder,
        sequential_targets=args.sequential_targets,
        sequential_targets_per_subgraph=args.sequential_targets_per_subgraph,
        check_vllm=args.check_vllm,
        vllm_python=args.vllm_python,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
