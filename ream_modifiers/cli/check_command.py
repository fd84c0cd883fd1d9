"""``ream-compress check``: imports neither torch nor llm-compressor."""

from __future__ import annotations

import sys

from ream_modifiers.errors import InputError

__all__ = ["run_check"]


def run_check(
    directory: str, vllm: bool = False, vllm_python: str | None = None
) -> int:
    """
    Check a checkpoint (and, with ``vllm``, load it in vLLM); print the report.

    :return: 0 when it passes, 1 when not
    :raises InputError: if ``vllm`` is asked for and vLLM cannot be run
    """
    from ream_modifiers.check import check_checkpoint
    from ream_modifiers.check.vllm_probe import VllmUnavailableError, probe_vllm

    report = check_checkpoint(directory)
    if vllm and report.ok:
        try:
            probe = probe_vllm(directory, vllm_python)
        except VllmUnavailableError as error:
            raise InputError(
                f"--vllm: {error}", "install vLLM here or pass --vllm-python"
            ) from None
        report.record_vllm(probe.ok, probe.describe())
    print(report.summary(), file=sys.stdout if report.ok else sys.stderr)
    return 0 if report.ok else 1
