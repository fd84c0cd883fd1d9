import os
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
