"""
The arguments of ``compress``, in four groups (the model, the calibration data,
the pipeline, the output), each a dataclass whose fields carry their command-line
help: the parser is built from them and :func:`ream_modifiers.cli.compress_command`
takes the same names, so an option is written once.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar

from ream_modifiers.errors import InputError

__all__ = [
    "ARGUMENT_GROUPS",
    "CALIBRATE_GROUPS",
    "CalibrateArguments",
    "CalibrationArguments",
    "CheckArguments",
    "DemoArguments",
    "LogArguments",
    "CompressJob",
    "ModelArguments",
    "OutputArguments",
    "PadArguments",
    "PipelineArguments",
    "PruneArguments",
    "StatisticsArguments",
    "add_argument_group",
    "namespace_options",
]


def _option(default: Any, help: str, **argparse_kwargs: Any) -> Any:
    """A field with its command-line help (``cli=False``: API only)."""
    return field(default=default, metadata={"help": help, **argparse_kwargs})


@dataclass
class ModelArguments:
    """The model and how it is loaded."""

    title: ClassVar[str] = "model"
    description: ClassVar[str | None] = None

    model: str = _option(MISSING, "local path or Hugging Face model ID", required=True)
    dtype: str = _option("auto", "auto, bfloat16, float16 or float32")
    trust_remote_code: bool = _option(
        False,
        "run modelling code shipped with the model (off by default: only for "
        "models whose code you trust)",
    )


@dataclass
class CalibrationArguments:
    """Where the calibration text comes from and how it becomes rows."""

    title: ClassVar[str] = "calibration data"
    description: ClassVar[str | None] = "give --dataset or --mix"

    dataset: str | None = _option(
        None,
        "calibration text: 'bundled', a local .txt/.jsonl file or folder, c4 / "
        "ultrachat / numinamath / the-stack-smol, or a Hugging Face dataset ID",
    )
    mix: str | None = _option(
        None,
        "general/math/code mix instead of --dataset, e.g. "
        "general=0.2,math=0.3,code=0.5 (c4, NuminaMath-1.5, the-stack-smol)",
    )
    mix_sources: dict[str, str] | None = _option(
        None,
        "replace a mix source by a local .txt/.jsonl file or folder, or "
        "bundled:<domain> (repeatable)",
        flag="--mix-source",
        action="append",
        metavar="NAME=PATH",
    )
    num_samples: int = _option(512, "calibration rows", type=int)
    max_seq_len: int = _option(2048, "tokens per row", type=int)
    text_field: str = _option("text", "text column of JSONL / HF data")
    packing: bool = _option(True, "one document per row instead of packed rows")
    chat_template: bool = _option(
        False, "wrap mix texts in the tokenizer's chat template"
    )
    seed: int = _option(42, "mix sampling seed", type=int)
    calibrate_all_experts: bool = _option(
        True,
        "run experts on routed tokens only (faster; REAP/AIMER do not need all)",
    )
    images: str | None = _option(
        "auto",
        "image+caption calibration rows for a vision-language model: 'bundled' "
        "(8 small drawings), a folder of images with an optional "
        "captions.jsonl, 'none' (text only), or 'auto' (bundled for a "
        "vision-language model with an image processor, else none)",
        metavar="SOURCE",
    )
    image_fraction: float = _option(
        0.25, "share of the calibration rows that carry an image", type=float
    )


@dataclass
class PipelineArguments:
    """Where the weights live and how llm-compressor's pipeline cuts the model."""

    title: ClassVar[str] = "larger than memory"
    description: ClassVar[str | None] = (
        "keep the weights off the execution device; llm-compressor's sequential "
        "pipeline onloads one decoder layer (plus its calibration activations) at "
        "a time"
    )

    offload: str = _option(
        "none",
        "where the weights live: cpu memory, disk (--offload-folder), or auto "
        "(cpu memory up to what is free less 5 GB, the rest on disk)",
        choices=["none", "cpu", "disk", "auto"],
    )
    offload_folder: str | None = _option(
        None,
        "empty or new folder for --offload disk/auto (links to the checkpoint and "
        "changed weights; emptied at the end)",
        metavar="DIR",
    )
    sequential_targets: list[str] | None = _option(
        None,
        "subgraph targets of the modifiers after the expert reduction, e.g. "
        "Qwen3MoeAttention ExpertMLP for GPTQ per expert (the reduction runs first "
        "in its own pass with whole decoder layers)",
        nargs="+",
        metavar="TARGET",
    )
    sequential_targets_per_subgraph: int = _option(
        1,
        "targets per subgraph with --sequential-targets (default 1)",
        type=int,
        metavar="N",
    )


@dataclass
class OutputArguments:
    """Where the checkpoint goes and what is checked before it is published."""

    title: ClassVar[str] = "output"
    description: ClassVar[str | None] = None

    output: str = _option(MISSING, "output directory", required=True)
    overwrite: bool = _option(False, "replace a non-empty output directory")
    check_vllm: bool = _option(
        False,
        "before publishing, load the result in vLLM with strict weight tracking "
        "and generate a few tokens; the model card records the outcome",
    )
    vllm_python: str | None = _option(
        None,
        "interpreter of an environment with vLLM for --check-vllm (default: this one)",
        metavar="PYTHON",
    )
    command: str | None = _option(
        None, "the command line, quoted in the model card", cli=False
    )


@dataclass
class StatisticsArguments:
    """Calibrate once, compress many times (``ream-compress calibrate``)."""

    title: ClassVar[str] = "calibration statistics"
    description: ClassVar[str | None] = (
        "decide the expert reduction from saved statistics instead of a forward "
        "pass, or save this run's"
    )

    from_stats: str | None = _option(
        None,
        "statistics directory (ream-compress calibrate, or --save-stats) to "
        "decide the expert reduction from, with no forward pass for it; "
        "--dataset is then needed only if another modifier calibrates (GPTQ)",
        metavar="DIR",
    )
    save_stats: str | None = _option(
        None,
        "new directory for the expert reduction's statistics; --from-stats DIR "
        "with the same recipe then reproduces this run exactly",
        metavar="DIR",
    )
    budget: str = _option(
        "uniform",
        "experts kept per layer: uniform, or the same total spread by each "
        "expert's share of its layer's routed output (saliency_fraction) or "
        "that output per token (saliency_mass); non-uniform needs --from-stats "
        "and its checkpoint loads through ream_modifiers (see README)",
        choices=["uniform", "saliency_fraction", "saliency_mass"],
    )
    pad: bool = _option(
        False,
        "with a non-uniform --budget: pad every layer to the largest count with "
        "zero experts that are never routed to (routers with a selection or "
        "logit bias: DeepSeek-V3, GLM-4.5, gpt-oss, ...), so stock vLLM and "
        "transformers load it; saves no memory over the largest layer's count",
    )


@dataclass
class CalibrateArguments:
    """``ream-compress calibrate``: where the statistics go, for which methods."""

    title: ClassVar[str] = "statistics"
    description: ClassVar[str | None] = None

    output: str = _option(MISSING, "new statistics directory", required=True)
    overwrite: bool = _option(False, "replace an existing statistics directory")
    methods: list[str] | None = _option(
        None,
        "methods whose statistics to record (default: every method that "
        "calibrates), e.g. reap ream",
        nargs="+",
        metavar="METHOD",
    )
    method_settings: dict[str, Any] | None = _option(
        None,
        "JSON {method: {setting: value}} for settings that change what is "
        'recorded, e.g. \'{"ream": {"max_activation_tokens": 2048}}\'',
        type=json.loads,
        metavar="JSON",
    )


@dataclass
class PadArguments:
    """``ream-compress pad``: a per-layer-count checkpoint padded to one count."""

    title: ClassVar[str] = "pad"
    description: ClassVar[str | None] = None

    model: str = _option(
        MISSING, "checkpoint with num_experts_per_layer (a non-uniform budget)",
        required=True,
    )  # fmt: skip
    output: str = _option(MISSING, "output directory", required=True)
    overwrite: bool = _option(False, "replace a non-empty output directory")


@dataclass
class PruneArguments:
    """``ream-compress prune``: a pruning report applied on disk."""

    title: ClassVar[str] = "prune on disk"
    description: ClassVar[str | None] = None

    model: str = _option(MISSING, "local checkpoint directory", required=True)
    report: str = _option(
        MISSING,
        "expert_reduction.json of a pruning run (REAP, AIMER, MoEITS, frequency, "
        "EAN) on the same model",
        required=True,
    )
    output: str = _option(MISSING, "output directory", required=True)
    overwrite: bool = _option(False, "replace a non-empty output directory")


@dataclass
class LogArguments:
    """How much ``compress`` and ``demo`` print."""

    title: ClassVar[str] = "logging"
    description: ClassVar[str | None] = None

    verbose: bool = _option(
        False,
        "keep llm-compressor's per-module logs (GPTQ prints a few lines for every "
        "Linear it quantizes)",
    )
    debug: bool = _option(False, "print the traceback of an error")


@dataclass
class DemoArguments:
    """``ream-compress demo``."""

    title: ClassVar[str] = "demo"
    description: ClassVar[str | None] = None

    output: str = _option("demo-output", "output directory")
    recipe: str = _option("reap_w4a16", "recipe name or YAML path")
    overwrite: bool = _option(
        False,
        "replace a non-empty output directory (an earlier demo output is replaced "
        "anyway)",
    )


@dataclass
class CheckArguments:
    """``ream-compress check``."""

    title: ClassVar[str] = "check"
    description: ClassVar[str | None] = None

    directory: str = _option(MISSING, "checkpoint directory", positional=True)
    vllm: bool = _option(
        False,
        "also load it in vLLM (strict weight tracking) and generate a few tokens; "
        "needs vLLM in this environment or --vllm-python",
    )
    vllm_python: str | None = _option(
        None,
        "interpreter of an environment with vLLM (default: this one)",
        metavar="PYTHON",
    )


ARGUMENT_GROUPS = (
    ModelArguments,
    CalibrationArguments,
    PipelineArguments,
    OutputArguments,
    StatisticsArguments,
)


# ``calibrate``: the model, data and pipeline of ``compress``, then where the
# statistics go (CalibrateArguments replaces the output group)
CALIBRATE_GROUPS = (
    ModelArguments,
    CalibrationArguments,
    PipelineArguments,
    CalibrateArguments,
)


@dataclass
class CompressJob:
    """Every argument of one ``compress`` run, by group."""

    recipe: str
    model: ModelArguments
    calibration: CalibrationArguments
    pipeline: PipelineArguments
    output: OutputArguments
    statistics: StatisticsArguments

    @classmethod
    def from_options(cls, recipe: str, **options: Any) -> CompressJob:
        """
        :param options: field names of the argument groups
        :raises TypeError: for a name no group has
        """
        groups = {}
        for group in ARGUMENT_GROUPS:
            names = {f.name for f in fields(group)}
            groups[group] = group(**{k: options.pop(k) for k in names & set(options)})
        if options:
            known = sorted(f.name for g in ARGUMENT_GROUPS for f in fields(g))
            raise TypeError(f"compress() got unknown options {sorted(options)}; "
                            f"known: {known}")  # fmt: skip
        return cls(recipe, *groups.values())

    @classmethod
    def from_namespace(cls, args: argparse.Namespace, command: str) -> CompressJob:
        """The job of a parsed ``ream-compress compress`` command line."""
        options = namespace_options(args, ARGUMENT_GROUPS)
        return cls.from_options(args.recipe, command=command, **options)


def namespace_options(args: argparse.Namespace, groups: tuple) -> dict[str, Any]:
    """The fields of ``groups`` from a parsed command line, by name."""
    options = {
        f.name: getattr(args, f.name)
        for group in groups
        for f in fields(group)
        if f.metadata.get("cli", True)
    }
    options["mix_sources"] = _mix_sources(args.mix_sources or [])
    return options


def _mix_sources(items: list[str]) -> dict[str, str]:
    sources = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            raise InputError(
                f"--mix-source {item!r} is not NAME=PATH",
                "e.g. --mix-source code=data/",
            )
        sources[name] = path
    return sources


def add_argument_group(parser: argparse.ArgumentParser, group: type) -> None:
    """Add one argument group's fields to ``parser`` as options."""
    target = parser.add_argument_group(group.title, group.description)
    for item in fields(group):
        meta = dict(item.metadata)
        if not meta.pop("cli", True):
            continue
        flag = meta.pop("flag", "--" + item.name.replace("_", "-"))
        if meta.pop("positional", False):
            target.add_argument(item.name, **meta)
            continue
        if item.default is True:  # an option that is on unless turned off
            flag = flag.replace("--", "--no-", 1)
            meta["action"] = "store_false"
        elif item.default is False:
            meta["action"] = "store_true"
        elif item.default is not MISSING:
            meta.setdefault("default", item.default)
        target.add_argument(flag, dest=item.name, **meta)
