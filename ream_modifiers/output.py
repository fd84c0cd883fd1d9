"""
All-or-nothing output directories.

A run writes into ``.<name>.tmp-<pid>`` beside the target, in the same parent, so
the final rename is atomic on one filesystem; the target therefore holds either
the previous complete output or the new one, never a half-written one. Staging
directories left by killed runs are recognised by the dead pid in their name and
removed by the next run.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from loguru import logger

from ream_modifiers.errors import InputError

__all__ = [
    "refuse_existing",
    "staging_dir",
    "remove_stale",
    "staged_output",
    "shared_staged_output",
]

_KINDS = ("tmp", "old")  # staging, and a replaced output awaiting deletion


def refuse_existing(target: Path, overwrite: bool) -> None:
    """
    :raises InputError: if ``target`` is a file, or a non-empty directory and
        ``overwrite`` is False
    """
    if not target.exists():
        return
    if not target.is_dir():
        raise InputError(
            f"{target} exists and is not a directory", "choose another --output"
        )
    if not overwrite and any(target.iterdir()):
        raise InputError(
            f"{target} exists and is not empty; pass --overwrite to replace it",
            "pass --overwrite, or choose another --output",
        )


def staging_dir(target: Path, kind: str = "tmp", pid: int | None = None) -> Path:
    """``.<name>.<kind>-<pid>`` beside ``target``."""
    pid = os.getpid() if pid is None else pid
    return target.parent / f".{target.name}.{kind}-{pid}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale(target: Path) -> list[Path]:
    """
    Remove the staging directories of ``target`` whose process is gone (or is
    this process: a previous call here was interrupted). A previous output moved
    aside by such a process is put back if ``target`` is missing.

    :return: the directories removed
    """
    removed = []
    if not target.parent.is_dir():
        return removed
    for path in target.parent.iterdir():
        for kind in _KINDS:
            prefix = f".{target.name}.{kind}-"
            suffix = path.name.removeprefix(prefix)
            if path.name == suffix or not suffix.isdigit():
                continue
            pid = int(suffix)
            if pid != os.getpid() and _alive(pid):
                logger.warning(f"{path} belongs to running process {pid}; left alone")
                continue
            if kind == "old" and not target.exists():
                # killed between moving the old output aside and the new one in
                logger.warning(f"Restoring {target} from {path}")
                os.replace(path, target)
                continue
            logger.info(f"Removing {path}, left by interrupted process {pid}")
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _publish(staging: Path, target: Path, overwrite: bool) -> None:
    # something may have been written to the target while this run worked
    refuse_existing(target, overwrite)
    old = None
    if target.exists():
        old = staging_dir(target, "old")
        os.replace(target, old)
    os.replace(staging, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staged_output(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """
    Yield an empty staging directory beside ``target``; when the block ends
    without an exception, rename it to ``target`` (replacing an existing output
    only with ``overwrite``). On any exception, or after SIGTERM or Ctrl-C, the
    staging directory is removed and ``target`` is left as it was.

    :param target: the final output directory
    :param overwrite: replace a non-empty ``target``
    """
    target = Path(target).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(target)
    staging = staging_dir(target)
    with _cancellation() as cancelled:
        staging.mkdir()
        try:
            yield staging
            if cancelled:
                # the signal's exception was swallowed where it landed (Python
                # ignores exceptions raised inside finalizers and callbacks)
                raise SystemExit(128 + cancelled[0])
            _publish(staging, target, overwrite)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


@contextmanager
def _cancellation() -> Iterator[list[int]]:
    """
    Inside the block SIGTERM (a scheduler's cancel, ``kill``) raises
    ``SystemExit`` and SIGINT (Ctrl-C) ``KeyboardInterrupt``, so the staging
    directory is removed on the way out instead of waiting for the next run.
    Each signal received is also recorded in the yielded list: an exception
    raised inside a finalizer is only printed by Python, and a run that carried
    on must still not publish. A signal the process ignores stays ignored (a
    shell starts background jobs with SIGINT ignored, so that Ctrl-C in the
    terminal leaves them running).
    """
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received  # signal handlers can only be set from the main thread
        return

    def cancel(signum, frame):
        received.append(signum)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)

    previous = {
        signum: signal.signal(signum, cancel)
        for signum in (signal.SIGTERM, signal.SIGINT)
        if signal.getsignal(signum) is not signal.SIG_IGN
    }
    try:
        yield received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextmanager
def shared_staged_output(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """
    :func:`staged_output` for every rank of a ``torchrun`` job (the same as it in
    one process). The source rank stages and publishes; every rank gets the same
    staging path, because llm-compressor's save has all ranks take part. When the
    block ends, the ranks exchange how it went, and the output is published only
    if it went well on every rank.

    :param target: the final output directory
    :param overwrite: replace a non-empty ``target``
    """
    from ream_modifiers.distributed import (
        broadcast_from_source,
        is_distributed,
        is_source_process,
    )

    if not is_distributed():
        with staged_output(target, overwrite) as staging:
            yield staging
        return
    if not is_source_process():
        kind, value = broadcast_from_source(None)
        if kind == "failed":
            raise SystemExit(
                f"error: the source rank stopped before calibration: {value}"
            )
        with _exchanging_outcome():
            yield Path(value)
        return
    announced = False
    try:
        with staged_output(target, overwrite) as staging:
            broadcast_from_source(("staging", str(staging)))
            announced = True
            with _exchanging_outcome():
                yield staging
    except BaseException as error:
        if not announced:  # the other ranks wait for the staging path
            broadcast_from_source(("failed", repr(error)))
        raise


@contextmanager
def _exchanging_outcome() -> Iterator[None]:
    """Every rank learns whether the block failed anywhere; raise if it did."""
    from torch import distributed as dist

    mine = None
    try:
        yield
    except BaseException as error:
        mine = f"rank {dist.get_rank()}: {error!r}"
        raise
    finally:
        outcomes = [None] * dist.get_world_size()
        dist.all_gather_object(outcomes, mine)
    failures = [outcome for outcome in outcomes if outcome is not None]
    if failures:
        raise SystemExit(f"error: another rank failed, nothing published: {failures}")
