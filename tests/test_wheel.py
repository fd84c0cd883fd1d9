"""
A wheel install works without the checkout: the wheel is built, installed into a
fresh venv outside the repository and its ``ream-compress`` run from elsewhere.
The new venv reaches the test venv's dependencies through a ``.pth`` line (nothing
is downloaded); it does not see the test venv's editable ream-modifiers, whose
import hook lives in a ``.pth`` file that a plain path line does not process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return env


def _run(command: list, cwd: Path, timeout: float = 120, **env: str) -> str:
    """Run ``command``; fail the test with its output unless it exits 0."""
    done = subprocess.run(
        [str(part) for part in command],
        cwd=cwd,
        env={**_env(), **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, (
        f"{command} exited {done.returncode}\n{done.stdout}\n{done.stderr}"
    )
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "--version"], capture_output=True, env=_env()
    )
    if pip.returncode != 0:
        pytest.skip(f"pip is not available to {sys.executable}: cannot build a wheel")
    work = tmp_path_factory.mktemp("wheel")
    # setuptools' build/ and egg-info go here, not into the checkout: a shared
    # build/lib there could carry stale modules into the wheel
    config = work / "build.cfg"
    config.write_text(
        f"[build]\nbuild_base = {work / 'build'}\n[egg_info]\negg_base = {work}\n"
    )
    output = _run(
        # -v shows setuptools' own output, where a deprecation warning would be
        [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps"]
        + ["--no-build-isolation", "-w", work / "dist", REPO],
        cwd=work,
        DIST_EXTRA_CONFIG=str(config),
    )
    # setuptools warns of a TOML-table `project.license` on every build
    assert "project.license" not in output, output
    (built,) = (work / "dist").glob("ream_modifiers-*.whl")
    return built


@pytest.fixture(scope="module")
def venv_bin(wheel, tmp_path_factory) -> Path:
    """The ``bin/`` of a fresh venv (outside the checkout) with the wheel."""
    root = tmp_path_factory.mktemp("venv") / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", root], cwd=root.parent)
    python = root / "bin" / "python"
    # installed before the test venv is visible, so that pip finds no other
    # ream-modifiers to replace
    _run(
        [sys.executable, "-m", "pip", "--python", python, "install", "--no-deps"]
        + ["--no-index", wheel],
        cwd=root.parent,
    )
    site = _run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        cwd=root.parent,
    ).strip()
    here = sysconfig.get_paths()
    dependencies = dict.fromkeys([here["purelib"], here["platlib"]])
    (Path(site) / "test_venv_dependencies.pth").write_text(
        "".join(f"{path}\n" for path in dependencies)
    )
    return root / "bin"


def test_wheel_ships_recipes_bundled_data_and_tables(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "ream_modifiers/recipes/reap_w4a16.yaml" in names
    for recipe in (REPO / "recipes").glob("*.yaml"):
        assert f"ream_modifiers/recipes/{recipe.name}" in names
    bundled = sorted((REPO / "ream_modifiers" / "data" / "bundled").glob("*.txt"))
    assert bundled
    for text in bundled:
        assert f"ream_modifiers/data/bundled/{text.name}" in names
    images = sorted((REPO / "ream_modifiers" / "data" / "bundled" / "images").iterdir())
    assert len(images) == 9  # 8 drawings and their captions
    for image in images:
        assert f"ream_modifiers/data/bundled/images/{image.name}" in names
    for table in ("data/image_prompts.yaml", "moe/unsupported.yaml"):
        assert f"ream_modifiers/{table}" in names
    # the 15 MB trained fixture stays in the repository
    assert not [name for name in names if "fixture" in name]


def test_wheel_install_imports_its_own_copy(venv_bin, tmp_path):
    script = textwrap.dedent(
        """
        import ream_modifiers
        from ream_modifiers.errors import InputError
        from ream_modifiers.resources import (
            demo_fixture, recipe_dirs, recipe_names, resolve_recipe
        )
        print("imported", ream_modifiers.__file__)
        assert [d.name for d in recipe_dirs()] == ["recipes"], recipe_dirs()
        assert recipe_dirs()[0].parent.samefile(
            ream_modifiers.__file__.rsplit("/", 1)[0]
        )
        assert "reap_w4a16" in recipe_names(), recipe_names()
        assert resolve_recipe("reap_w4a16").is_file()
        assert demo_fixture() is None
        try:
            resolve_recipe("no_such_recipe")
        except InputError as error:
            assert "not found; known recipes" in error.problem, error.problem
            assert "reap_w4a16" in error.problem, error.problem
        else:
            raise AssertionError("an unknown recipe resolved")
        """
    )
    printed = _run([venv_bin / "python", "-c", script], cwd=tmp_path)
    (line,) = [line for line in printed.splitlines() if line.startswith("imported ")]
    location = Path(line.removeprefix("imported ")).resolve()
    assert location.is_relative_to(venv_bin.parent.resolve()), location


def test_wheel_demo_falls_back_to_a_random_model(venv_bin, tmp_path):
    """The installed package compresses with a named recipe (the demo's
    reap_w4a16) and its ``ream-compress`` script checks the output."""
    # the demo as the CLI runs it, with a smaller calibration: its 64 x 128 tokens
    # take about a minute on 2 cores, more than this test's share
    script = textwrap.dedent(
        """
        import sys
        from ream_modifiers.cli import demo_command
        from ream_modifiers.cli.logs import quiet_library_logs

        full = demo_command.compress

        def smaller(*args, **kwargs):
            return full(*args, **{**kwargs, "num_samples": 8, "max_seq_len": 32})

        demo_command.compress = smaller
        quiet_library_logs()
        demo_command.demo(sys.argv[1])
        """
    )
    output = _run([venv_bin / "python", "-c", script, tmp_path / "demo"], tmp_path)
    assert "trained demo fixture" in output and "random" in output, output
    assert "skipping the before/after perplexity" in output, output
    assert (tmp_path / "demo" / "config.json").is_file()
    assert not (tmp_path / "demo" / "demo_perplexity.json").exists()
    assert "reloaded" in output, output
    # the installed console script checks what the demo wrote
    _run([venv_bin / "ream-compress", "check", tmp_path / "demo"], cwd=tmp_path)
