"""
``ream-compress``: run a recipe on a Hugging Face MoE model and write a
compressed-tensors checkpoint, its tokenizer and the per-layer report.

    ream-compress compress recipes/reap_w4a16.yaml --model Qwen/Qwen3-30B-A3B \\
        --dataset c4 --num-samples 512 --max-seq-len 2048 --output out/
    ream-compress demo
    ream-compress check out/
    ream-compress calibrate --model Qwen/Qwen3-30B-A3B --dataset c4 --output stats/
    ream-compress compress reap_w4a16 --model ... --from-stats stats/ --output out/
    ream-compress prune --model ckpt/ --report run/expert_reduction.json --output p/

One module per command (:mod:`~ream_modifiers.cli.compress_command`,
:mod:`~ream_modifiers.cli.demo_command`, :mod:`~ream_modifiers.cli.check_command`); the
options of ``compress`` are the argument groups of :mod:`ream_modifiers.cli.args`.
Bad input prints ``error:`` and ``fix:`` and exits 2; ``--debug`` adds the
traceback.
"""

from __future__ import annotations

import shlex
import sys
import traceback

from ream_modifiers.cli.parser import build_parser
from ream_modifiers.errors import InputError

__all__ = ["CompressionSummary", "calibrate", "compress", "demo", "main"]


def __getattr__(name: str):
    # the commands import torch and llm-compressor: only when asked for
    if name in ("compress", "run_job"):
        from ream_modifiers.cli import compress_command

        return getattr(compress_command, name)
    if name == "demo":
        from ream_modifiers.cli.demo_command import demo

        return demo
    if name == "calibrate":
        from ream_modifiers.cli.calibrate_command import calibrate

        return calibrate
    if name in ("CompressionSummary", "SUMMARY_FILENAME", "CALIBRATION_FILENAME"):
        from ream_modifiers.cli import summary

        return getattr(summary, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main(argv: list[str] | None = None) -> int:
    """
    The ``ream-compress`` entry point.

    :return: 0 on success, 1 when a checkpoint fails its check or a run fails,
        2 on bad input
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        return _run_command(args, argv)
    except InputError as error:
        if debug:
            traceback.print_exc()
        print(f"error: {error.problem}\nfix: {error.fix}", file=sys.stderr)
        return 2
    except Exception as error:  # noqa: BLE001 - one line instead of a traceback
        from ream_modifiers.check import CheckpointCheckError

        if debug:
            traceback.print_exc()
        if isinstance(error, CheckpointCheckError):
            output = getattr(args, "output", "the output")
            print(
                f"error: the compressed checkpoint failed the check, so nothing "
                f"was written to {output}:\n{error}",
                file=sys.stderr,
            )
            return 1
        print(
            f"error: {type(error).__name__}: {error}\nfix: rerun with --debug for "
            "the traceback; if the input is right, please report it",
            file=sys.stderr,
        )
        return 1


def _run_command(args, argv: list[str]) -> int:
    if args.command == "check":
        from ream_modifiers.cli.check_command import run_check

        return run_check(args.directory, args.vllm, args.vllm_python)
    if args.command in ("prune", "pad"):
        return _on_disk(args)
    if not args.verbose:
        from ream_modifiers.cli.logs import quiet_library_logs

        quiet_library_logs()
    if args.command == "demo":
        from ream_modifiers.cli.demo_command import demo

        demo(args.output, args.recipe, overwrite=args.overwrite)
        return 0
    if args.command == "calibrate":
        from ream_modifiers.cli.calibrate_command import calibrate_from_namespace

        calibrate_from_namespace(args)
        return 0
    from ream_modifiers.cli.args import CompressJob
    from ream_modifiers.cli.compress_command import run_job

    run_job(CompressJob.from_namespace(args, shlex.join(["ream-compress", *argv])))
    return 0


def _on_disk(args) -> int:
    """``prune`` and ``pad``: checkpoint edits that never load the model."""
    from ream_modifiers.disk_pad import pad_on_disk
    from ream_modifiers.disk_prune import DiskPruneError, prune_on_disk

    try:
        if args.command == "prune":
            check = prune_on_disk(args.model, args.report, args.output, args.overwrite)
        else:
            check = pad_on_disk(args.model, args.output, args.overwrite)
    except DiskPruneError as error:
        fix = (
            "pass the report of a pruning run on this very model"
            if args.command == "prune"
            else "pad a checkpoint a non-uniform budget wrote, of a family whose "
            "router has a selection or logit bias"
        )
        raise InputError(str(error), fix) from None
    print(check.summary())
    return 0


# re-exported for callers of the old module: they keep working
from ream_modifiers.resources import REPO_RECIPES, REPO_ROOT, resolve_recipe  # noqa: E402,F401,I001
