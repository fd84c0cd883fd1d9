"""What a refused ``ream-compress`` run prints: one ``error:`` line, then ``fix:``."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

__all__ = ["Refusal", "error_and_fix", "refused"]


@dataclass(frozen=True)
class Refusal:
    """
    A refused run's output.

    :param error: the ``error:`` line, without the prefix
    :param fix: the ``fix:`` line after it, without the prefix
    :param err: all of stderr
    :param out: all of stdout
    """

    error: str
    fix: str
    err: str
    out: str


def error_and_fix(stderr: str) -> tuple[str, str]:
    """
    The problem and the fix of ``stderr``, asserting that it holds exactly one
    ``error:`` line and that a ``fix:`` line follows it (log lines around them
    are allowed).
    """
    lines = stderr.splitlines()
    at = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    assert len(at) == 1, f"expected one 'error: ' line in:\n{stderr}"
    fix = lines[at[0] + 1] if at[0] + 1 < len(lines) else ""
    assert fix.startswith("fix: "), f"no 'fix: ' line after the error in:\n{stderr}"
    return lines[at[0]].removeprefix("error: "), fix.removeprefix("fix: ")


def refused(capsys: pytest.CaptureFixture[str], argv: list[str]) -> Refusal:
    """
    Run ``ream_modifiers.cli.main(argv)`` in this process and assert that it
    refused the input: exit code 2, one error and its fix, no traceback.

    :param capsys: the test's capsys fixture (earlier output is discarded)
    :param argv: the command line after ``ream-compress``
    """
    from ream_modifiers.cli import main

    capsys.readouterr()
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2, f"exit code {code}, stderr:\n{captured.err}"
    for stream in (captured.err, captured.out):
        assert "Traceback" not in stream, stream
    error, fix = error_and_fix(captured.err)
    return Refusal(error, fix, captured.err, captured.out)
