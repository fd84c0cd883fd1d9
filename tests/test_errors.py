"""Bad model paths are refused before anything loads: exit 2, error and fix."""

from __future__ import annotations

import pytest

from ream_modifiers.cli import main
from ream_modifiers.errors import InputError, check_model_source


def _compress(model: str, out) -> list[str]:
    return ["compress", "reap_w4a16", "--model", model, "--dataset", "bundled",
            "--output", str(out)]  # fmt: skip


@pytest.mark.parametrize(
    ("make", "named"),
    [
        (lambda tmp: str(tmp / "missing"), "does not exist"),
        (lambda tmp: "./not/here", "does not exist"),
        (lambda tmp: str((tmp / "empty").mkdir() or tmp / "empty"), "no config.json"),
    ],
)
def test_bad_model_path(tmp_path, capsys, make, named):
    model = make(tmp_path)
    assert main(_compress(model, tmp_path / "out")) == 2
    err = capsys.readouterr().err
    error, fix = err.strip().split("\n", 1)
    assert error == f"error: model directory {model} " + (
        "does not exist" if named == "does not exist" else "has no config.json"
    )
    assert fix.startswith("fix: ")
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_hub_ids_are_left_to_the_hub():
    check_model_source("Qwen/Qwen3-30B-A3B")  # no local check, no error
    check_model_source("gpt2")
    with pytest.raises(InputError, match="does not exist"):
        check_model_source("/abs/path/model")
