"""The ``ream-compress`` command line: its parser and the methods help."""

from __future__ import annotations

import argparse

from ream_modifiers.cli.args import (
    ARGUMENT_GROUPS,
    CALIBRATE_GROUPS,
    CheckArguments,
    DemoArguments,
    LogArguments,
    PadArguments,
    PruneArguments,
    add_argument_group,
)
from ream_modifiers.errors import InputError
from ream_modifiers.resources import recipe_names

__all__ = ["UsageError", "build_parser", "methods_help"]


class UsageError(InputError):
    """A command line that argparse refuses (unknown option or choice)."""


class _Parser(argparse.ArgumentParser):
    """
    Raises :class:`UsageError` where argparse would print and exit, and writes
    the methods help only when help is printed (it imports every modifier, which
    ``check`` does not need).
    """

    def error(self, message: str):
        raise UsageError(message, f"see {self.prog} --help")

    def format_help(self) -> str:
        if self.epilog is _METHODS:
            self.epilog = methods_help()
        return super().format_help()


_METHODS = "(registered methods)"  # placeholder until help is printed


def methods_help() -> str:
    """Every registered method and every recipe name, for ``--help``."""
    import ream_modifiers.modifiers  # noqa: F401  (each method folder registers)
    from ream_modifiers.registry import methods

    lines = ["methods (recipe modifier names):"]
    lines += [
        f"  {m.class_name:26s}{m.label}{' baseline' * m.baseline}: {m.summary}"
        for m in methods()
    ]
    lines.append(f"recipes by name: {', '.join(recipe_names())}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The parser of every ``ream-compress`` command."""
    parser = _Parser(
        prog="ream-compress",
        description="Prune or merge MoE experts, then quantize, with a recipe.",
        epilog=_METHODS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser(
        "compress",
        help="run a recipe on a model",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    run.add_argument("recipe", help="recipe YAML path, or a recipe name (reap_w4a16)")
    for group in (*ARGUMENT_GROUPS, LogArguments):
        add_argument_group(run, group)
    record = commands.add_parser(
        "calibrate",
        help="calibrate once and save every MoE layer's statistics, for "
        "`compress --from-stats` at any method and ratio",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for group in (*CALIBRATE_GROUPS, LogArguments):
        add_argument_group(record, group)
    prune = commands.add_parser(
        "prune",
        help="apply a pruning report (expert_reduction.json) to a checkpoint on "
        "disk, shard by shard, without loading the model",
    )
    add_argument_group(prune, PruneArguments)
    pad = commands.add_parser(
        "pad",
        help="pad a per-layer-count checkpoint to one expert count (zero experts "
        "never routed to), so stock vLLM loads it",
    )
    add_argument_group(pad, PadArguments)
    show = commands.add_parser("demo", help="compress a small MoE model end to end")
    for group in (DemoArguments, LogArguments):
        add_argument_group(show, group)
    verify = commands.add_parser(
        "check",
        help="check that a checkpoint has what vLLM needs (reads config.json and "
        "safetensors headers only)",
    )
    add_argument_group(verify, CheckArguments)
    return parser
