"""
``ream-compress check --vllm``: load the checkpoint in vLLM itself, with strict
weight tracking, and generate a few tokens. vLLM runs in a child process, with
this interpreter or another that has vLLM (``--vllm-python``: vLLM and
llm-compressor usually pin different transformers, so they often live in
separate environments), and on whatever device that vLLM build uses.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = ["VllmProbe", "VllmUnavailableError", "probe_vllm", "require_vllm"]

_WORKER = Path(__file__).with_name("vllm_worker.py")


class VllmUnavailableError(RuntimeError):
    """The interpreter asked to run vLLM cannot import it."""


@dataclass(frozen=True)
class VllmProbe:
    """What vLLM did with the checkpoint."""

    ok: bool
    version: str | None
    detail: str  # the generated text, or the error

    def describe(self) -> str:
        engine = f"vLLM {self.version}" if self.version else "vLLM"
        if self.ok:
            return (
                f"{engine} loaded it with strict weight tracking and generated "
                f"{self.detail!r}"
            )
        return f"{engine} failed: {self.detail}"


def require_vllm(python: str | None = None) -> None:
    """
    :raises VllmUnavailableError: if ``python`` (this interpreter by default)
        cannot import vllm; cheap enough to call before calibration
    """
    python = python or sys.executable
    probe = subprocess.run(
        [python, "-c", "import vllm"], capture_output=True, text=True, timeout=300
    )
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        raise VllmUnavailableError(
            f"{python} cannot import vllm ({last}); install vLLM there, or pass "
            "--vllm-python with the interpreter of an environment that has it"
        )


def probe_vllm(
    directory: str | os.PathLike,
    python: str | None = None,
    tokens: int = 8,
    timeout: int = 1800,
) -> VllmProbe:
    """
    Load ``directory`` in vLLM and generate ``tokens`` greedy tokens.

    :param directory: the checkpoint
    :param python: interpreter with vLLM; this one by default
    :param tokens: tokens to generate
    :param timeout: seconds before the attempt counts as failed
    :raises VllmUnavailableError: if ``python`` cannot import vllm
    """
    python = python or sys.executable
    require_vllm(python)
    try:
        run = subprocess.run(
            [python, str(_WORKER), str(Path(directory).resolve()), str(tokens)],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return VllmProbe(False, None, f"no result within {timeout} s")
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    if not lines:
        tail = (run.stderr.strip().splitlines() or ["no output"])[-1]
        return VllmProbe(False, None, f"the vLLM process died ({tail})")
    result = json.loads(lines[-1])
    if result.get("ok"):
        return VllmProbe(True, result.get("version"), str(result.get("text")))
    return VllmProbe(False, result.get("version"), _root_cause(result, run.stderr))


def _root_cause(result: dict, stderr: str) -> str:
    """
    The error, or, when vLLM's engine process failed and the error only says
    "see root cause above", the first exception its log shows.
    """
    error = str(result.get("error"))
    if "root cause" not in error:
        return error
    for line in stderr.splitlines():
        match = re.search(r"\b(\w+(Error|Exception)): (.+)$", line)
        if match and "root cause" not in match.group(3):
            return f"{match.group(1)}: {match.group(3)}"
    return error
