import os
import signal
import subprocess

import pytest

from ream_modifiers.errors import InputError
from ream_modifiers.output import (
    refuse_existing,
    remove_stale,
    staged_output,
    staging_dir,
)


def _dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_refuse_existing(tmp_path):
    refuse_existing(tmp_path / "absent", overwrite=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    refuse_existing(empty, overwrite=False)
    (empty / "f").write_text("x")
    with pytest.raises(InputError, match="is not empty; pass --overwrite"):
        refuse_existing(empty, overwrite=False)
    refuse_existing(empty, overwrite=True)
    with pytest.raises(InputError, match="exists and is not a directory"):
        refuse_existing(empty / "f", overwrite=True)


def test_staging_is_beside_the_target_and_renamed_on_success(tmp_path):
    target = tmp_path / "sub" / "out"
    with staged_output(target) as staging:
        assert staging == tmp_path / "sub" / f".out.tmp-{os.getpid()}"
        assert not target.exists()
        (staging / "model.safetensors").write_text("weights")
    assert (target / "model.safetensors").read_text() == "weights"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out"]


def test_failure_keeps_the_previous_output(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("previous")
    with pytest.raises(RuntimeError, match="boom"):
        with staged_output(target, overwrite=True) as staging:
            (staging / "new.txt").write_text("partial")
            raise RuntimeError("boom")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in target.iterdir()] == ["old.txt"]


def test_overwrite_replaces_the_whole_output(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("previous")
    with staged_output(target, overwrite=True) as staging:
        (staging / "new.txt").write_text("fresh")
    assert [p.name for p in target.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_output_appearing_during_the_run_is_not_clobbered(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(InputError, match="is not empty"):
        with staged_output(target) as staging:
            (staging / "new.txt").write_text("fresh")
            target.mkdir()
            (target / "theirs.txt").write_text("someone else's")
    assert [p.name for p in target.iterdir()] == ["theirs.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_stale_staging_of_dead_processes_is_removed(tmp_path):
    target = tmp_path / "out"
    dead = staging_dir(target, pid=_dead_pid())
    old = staging_dir(target, "old", pid=_dead_pid())
    alive = staging_dir(target, pid=os.getppid())
    unrelated = [tmp_path / ".out.tmp-abc", tmp_path / ".outer.tmp-1", tmp_path / "x"]
    for path in [target, dead, old, alive, *unrelated]:
        path.mkdir()
        (path / "f").write_text("x")
    assert sorted(remove_stale(target)) == sorted([dead, old])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        p.name for p in [target, alive, *unrelated]
    )
    with staged_output(target, overwrite=True) as staging:
        (staging / "f").write_text("x")
    assert alive.is_dir() and target.is_dir()


def test_output_moved_aside_by_a_killed_run_is_restored(tmp_path):
    target = tmp_path / "out"
    aside = staging_dir(target, "old", pid=_dead_pid())
    aside.mkdir()
    (aside / "model.safetensors").write_text("previous")
    assert remove_stale(target) == []
    assert (target / "model.safetensors").read_text() == "previous"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


class _SignalledWhileFinalized:
    """A signal arriving while Python runs a finalizer: Python prints the
    exception its handler raises there and carries on."""

    def __init__(self, signum: int):
        self.signum = signum

    def __del__(self):
        os.kill(os.getpid(), self.signum)


@pytest.fixture
def default_handlers():
    """Python's own SIGINT and SIGTERM handling, whatever pytest was started
    with (a background job has SIGINT ignored)."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_swallowed_by_a_finalizer_still_stops_the_publish(
    tmp_path, signum, default_handlers
):
    target = tmp_path / "out"
    with pytest.raises(SystemExit) as stopped:
        with staged_output(target) as staging:
            (staging / "model.safetensors").write_text("half")
            finalized = _SignalledWhileFinalized(signum)
            del finalized
            assert staging.is_dir()  # the run went on after the signal
    assert stopped.value.code == 128 + signum
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_an_ignored_sigint_stays_ignored(tmp_path, default_handlers):
    """A background job (SIGINT ignored by the shell) is not cancelled by it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    target = tmp_path / "out"
    with staged_output(target) as staging:
        (staging / "model.safetensors").write_text("whole")
        os.kill(os.getpid(), signal.SIGINT)
    assert (target / "model.safetensors").read_text() == "whole"
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
